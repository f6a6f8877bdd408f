"""Reading local data files into located records, ``(where, record)``: JSONL (a line each),
JSON (a list, or ``{"data": [...]}``) and parquet, with every record checked for what cannot be
one (a key given twice, nesting past :data:`_MAX_DEPTH`, a line over :data:`MAX_RECORD_BYTES`)
and every failure a :class:`~kava.data.schema.DataError` naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from kava.data.schema import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
Located = tuple[str, Any]  # (where, record or DataError)


MAX_RECORD_BYTES = 1 << 20  # a JSONL line (one record) longer than 1 MiB is refused, not read
_MAX_DEPTH = 32  # JSON nested deeper than this is not a record


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object that refuses a key given twice (``json`` keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DataError(f"duplicate key {key!r} in one object", field=key)
        out[key] = value
    return out


def _depth_ok(obj: Any, limit: int = _MAX_DEPTH) -> bool:
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return True


def _loads(text: str, where: str) -> Any:
    """One JSON value; every failure a :class:`DataError` at ``where`` (invalid JSON, a duplicate
    key, nesting beyond :data:`_MAX_DEPTH`, an integer Python refuses to read)."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} (line {err.lineno}, column {err.colno})", where=where) from None
    except DataError as err:
        raise err.at(where) from None
    except RecursionError:
        raise DataError(f"JSON nested too deeply (more than {_MAX_DEPTH} levels)", where=where) from None
    except ValueError as err:  # e.g. an integer of over 4,300 digits
        raise DataError(f"unreadable JSON value ({str(err).split(';')[0]})", where=where) from None
    if not _depth_ok(value):
        raise DataError(f"JSON nested too deeply (more than {_MAX_DEPTH} levels)", where=where)
    return value


def _read_jsonl(path: Path) -> Iterator[Located]:
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                break
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line unread
                    raw = f.readline(MAX_RECORD_BYTES)
                yield where, DataError(f"line longer than {MAX_RECORD_BYTES} bytes: not one record", where=where)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, DataError(f"not UTF-8 text (byte {err.start} of the line)", where=where)
                continue
            if not line.strip():
                continue
            try:
                yield where, _loads(line, where)
            except DataError as err:
                yield where, err


def _read_json(path: Path) -> Iterator[Located]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"not UTF-8 text (byte {err.start})", where=str(path)) from None
    if not text.strip():
        raise DataError("empty file: expected a list of records", where=str(path))
    data = _loads(text, str(path))
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a list of records or an object with a 'data' list", where=str(path))
    for i, record in enumerate(data, start=1):
        yield f"{path}:record {i}", record


def _read_parquet(path: Path) -> Iterator[Located]:
    import pyarrow
    import pyarrow.parquet as pq

    i = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                i += 1
                yield f"{path}:record {i}", record
    except (pyarrow.ArrowException, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"not a readable Parquet file ({first})", where=f"{path}:record {i + 1}") from None


def read_file(path: Path) -> Iterator[Located]:
    if not path.is_file():
        if path.exists():  # a folder, a pipe or a device: never read as data (a pipe would block)
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise DataError(f"{kind}, not a data file (.jsonl, .json or .parquet)", where=str(path))
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}", where=str(path))

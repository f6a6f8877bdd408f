"""Local data files: write examples as JSONL in kava's schema, check every record of a file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from kava.data.loaders import load_examples
from kava.data.schema import DataError, Example, example_to_record
from kava.io import check_output_file

__all__ = ["validate_file", "write_jsonl"]


def write_jsonl(examples: Iterable[Example], path: str | os.PathLike[str]) -> int:
    """Write examples as JSONL in our schema, atomically (temp file + os.replace); the count."""
    out = check_output_file(path, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(example_to_record(ex), ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def validate_file(path: str | os.PathLike[str], fmt: str | None = None) -> int:
    """Check every record of a local data file; the record count. Raises DataError at
    the first bad record (or when the file holds none)."""
    n = sum(1 for _ in load_examples(str(path), streaming=True, on_error="raise", fmt=fmt))
    if n == 0:
        raise DataError("no records", where=str(path))
    return n

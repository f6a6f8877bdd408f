"""One entry point for every dataset: `load_examples(source, split, ...)`.

`source` is a registered dataset name (see `list_datasets()` / ``kava data list``) or a
local file: ``.jsonl`` (one record per line), ``.json`` (a list of records or
``{"data": [...]}``) or ``.parquet``. A local record's layout is recognised by its fields
(`map_auto`): kava's schema (`kava.data.schema`: question, steps, answer), TRL's
``messages`` (`map_messages`) and ``prompt``/``completion`` (`map_prompt_completion`), or
GSM8k's raw question/answer with ``#### N`` (`map_gsm8k`). `fmt` forces one of
:data:`FORMATS`, or names a registered dataset whose native field layout the file uses
(``fmt="svamp"``, and so on).

Hub datasets are read with the `datasets` library. Each one's field layout is mapped onto
the schema by a pure function (`map_gsm8k`, `map_svamp`, ...) so the mapping is testable
offline.

Bad records: ``on_error="raise"`` raises `DataError` at the first one (file, line or
record number, field); ``on_error="skip"`` drops them, logs how many, and reports the
count through `load_examples_report`.

`load_data(cfg, which)` gives the training or evaluation examples a run's config names.

A limit on a template dataset (examples whose ``source_id`` ends in ``-t<template>-s<seed>-<i>``,
as GSM-Symbolic's ``gsm-symbolic-eng-t0012-s0-3`` do, also in a file exported from one) is
spread over the templates, round-robin (see `spread_over_templates`), instead of taking the
first N, which would all be instances of one template.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from kava.data.formats import (
    Mapper,
    Record,
    map_auto,
    map_gsm8k,
    map_messages,
    map_prompt_completion,
)
from kava.data.readers import FILE_SUFFIXES, Located, read_file
from kava.data.registry import REGISTRY, DatasetSpec, parse_source_options
from kava.data.schema import DataError, Example, example_from_record

if TYPE_CHECKING:
    from kava.config import KavaConfig

__all__ = [
    "FORMATS",
    "LoadReport",
    "load_data",
    "load_examples",
    "load_examples_report",
]

log = logging.getLogger(__name__)

_MAX_ERRORS_KEPT = 20


# --------------------------------------------------------------------------- readers


@dataclass
class LoadReport:
    """What a load produced: the examples, how many bad records were skipped, and the
    first few error messages."""

    examples: list[Example] = field(default_factory=list)
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _hub_rows(
    hub_id: str, config: str | None, split: str, streaming: bool, cache_dir: str | None = None
) -> Iterable[Record]:
    """Rows of a hub dataset split via `datasets.load_dataset` (network or local cache;
    ``cache_dir`` None: datasets' own, ``$HF_DATASETS_CACHE`` or ``$HF_HOME/datasets``)."""
    import datasets

    from ..io import hub_offline, hub_unreachable

    reason = hub_unreachable()
    if reason is not None:
        raise DataError(
            f"the hub dataset {hub_id} cannot be read ({reason}): if it is in the cache here, set HF_HUB_OFFLINE=1; "
            f"else give a local .jsonl/.json/.parquet file (`kava data export` it where the hub is reachable)",
            where=hub_id,
        )
    try:
        return datasets.load_dataset(hub_id, config, split=split, streaming=streaming, cache_dir=cache_dir)
    except (
        OSError,
        ValueError,
        ConnectionError,
        datasets.exceptions.DatasetNotFoundError,
    ) as err:  # offline, not cached
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the cache"
            if hub_offline()
            else "no network? with it cached, set HF_HUB_OFFLINE=1"
        )
        raise DataError(
            f"the hub dataset {hub_id} cannot be read ({first}; {hint}): give a local .jsonl/.json/.parquet "
            f"file instead (`kava data export` it where the hub is reachable)",
            where=hub_id,
        ) from None


def _hub_split(spec: DatasetSpec, split: str) -> str:
    if split in spec.splits:
        return spec.splits[split]
    if spec.hub_id is not None and split in spec.splits.values():
        return split
    raise DataError(f"unknown split {split!r}; available: {', '.join(spec.splits)}", where=spec.name)


def _located_hub(spec: DatasetSpec, split: str, streaming: bool, cache_dir: str | None = None) -> Iterator[Located]:
    assert spec.hub_id is not None
    rows = _hub_rows(spec.hub_id, spec.config, _hub_split(spec, split), streaming, cache_dir)
    for i, row in enumerate(rows, start=1):
        yield f"{spec.name}/{split}:{i}", row


# Record layouts a local file may be forced to (data.format, --fmt), besides registered datasets' own.
FORMATS: dict[str, Mapper | None] = {
    "auto": map_auto,
    "kava": None,
    "messages": map_messages,
    "prompt_completion": map_prompt_completion,
    "gsm8k": map_gsm8k,
}


def _resolve_mapper(fmt: str | None) -> Mapper | None:
    if fmt is None:
        return map_auto
    if fmt in FORMATS:
        return FORMATS[fmt]
    spec = REGISTRY.get(fmt)
    if spec is None or spec.mapper is None:
        names = [*FORMATS, *(n for n, s in REGISTRY.items() if s.mapper is not None and n not in FORMATS)]
        raise ValueError(f"unknown format {fmt!r}; use one of: {', '.join(names)}")
    return spec.mapper


def _examples(
    located: Iterable[Located], mapper: Mapper | None, on_error: str, report: LoadReport
) -> Iterator[Example]:
    """Validate located records into Examples, raising or counting bad ones."""
    for where, record in located:
        try:
            if isinstance(record, DataError):
                raise record
            mapped = mapper(record) if mapper is not None else record
            example = example_from_record(mapped, where)
        except DataError as err:
            located_err = err.at(where)
            if on_error == "raise":
                raise located_err from None
            report.skipped += 1
            if len(report.errors) < _MAX_ERRORS_KEPT:
                report.errors.append(str(located_err))
            continue
        yield example


def _stream(
    source: str,
    split: str,
    *,
    fmt: str | None,
    on_error: str,
    options: Mapping[str, Any] | None,
    limit: int | None,
    streaming: bool,
    report: LoadReport,
    cache_dir: str | None = None,
) -> Iterator[Example]:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}", where=source)
    options = options or {}
    spec = REGISTRY.get(source)
    if spec is None and "?" in source and source.split("?", 1)[0] in REGISTRY:
        spec, options = REGISTRY[source.split("?", 1)[0]], {**parse_source_options(source), **options}
    if spec is not None:
        if fmt is not None:
            raise ValueError(f"fmt applies to local files only, not to the registered dataset {source!r}")
        if spec.generate is not None:
            if split not in spec.splits:
                raise DataError(f"unknown split {split!r}; available: {', '.join(spec.splits)}", where=source)
            try:
                examples: Iterable[Example] = spec.generate(split, limit, options)
            except DataError:
                raise
            except (TypeError, ValueError) as err:  # a knob the generator cannot use
                raise DataError(f"bad option: {err}", where=source) from None
        else:
            if options:
                raise DataError("options apply to generated datasets only", where=source)
            examples = _examples(_located_hub(spec, split, streaming, cache_dir), spec.mapper, on_error, report)
    else:
        path = Path(source)
        if not path.exists() and path.suffix.lower() not in FILE_SUFFIXES:
            raise DataError(
                f"unknown dataset {source!r}: not a registered name ({', '.join(REGISTRY)}) "
                f"nor a {'/'.join(FILE_SUFFIXES)} file"
            )
        if options:
            raise DataError("options apply to generated datasets only, not to files", where=source)
        examples = _examples(read_file(path), _resolve_mapper(fmt), on_error, report)
    return _limited(iter(examples), limit)


_TEMPLATE_ID = re.compile(r"-t(\d+)-s-?\d+-\d+$")


def template_of(example: Example) -> str | None:
    """The template an example was drawn from, read from a ``source_id`` that ends in
    ``-t<template>-s<seed>-<i>`` (GSM-Symbolic's), or None."""
    m = _TEMPLATE_ID.search(example.source_id)
    return m.group(1) if m else None


def spread_over_templates(examples: Iterable[Example], limit: int) -> list[Example]:
    """``limit`` examples taken round-robin over their templates (in order of first appearance:
    each template's first instance, then each one's second, ...), returned in their original
    order. Examples without a template id count as one template of their own."""
    examples = list(examples)
    by_template: dict[str | None, list[int]] = {}
    for i, ex in enumerate(examples):
        by_template.setdefault(template_of(ex), []).append(i)
    taken: list[int] = []
    rank = 0
    while len(taken) < min(limit, len(examples)):
        for indices in by_template.values():
            if rank < len(indices) and len(taken) < limit:
                taken.append(indices[rank])
        rank += 1
    return [examples[i] for i in sorted(taken)]


def _limited(examples: Iterator[Example], limit: int | None) -> Iterator[Example]:
    """The first ``limit`` examples, or, when the first one names a template, ``limit`` spread
    over the templates (which reads them all)."""
    if limit is None:
        return examples
    first = next(examples, None)
    if first is None:
        return iter(())
    examples = chain([first], examples)
    if template_of(first) is None:
        return islice(examples, limit)
    return iter(spread_over_templates(examples, limit))


def load_examples_report(
    source: str,
    split: str = "train",
    *,
    limit: int | None = None,
    on_error: str = "raise",
    fmt: str | None = None,
    options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> LoadReport:
    """Like `load_examples` (not streaming), also returning the skipped-record count."""
    report = LoadReport()
    report.examples = list(
        _stream(
            source,
            split,
            fmt=fmt,
            on_error=on_error,
            options=options,
            limit=limit,
            streaming=False,
            report=report,
            cache_dir=cache_dir,
        )
    )
    if report.skipped:
        log.warning("%s [%s]: skipped %d bad record(s); first: %s", source, split, report.skipped, report.errors[0])
    return report


@overload
def load_examples(
    source: str,
    split: str = ...,
    *,
    limit: int | None = ...,
    streaming: Literal[False] = ...,
    on_error: str = ...,
    fmt: str | None = ...,
    options: Mapping[str, Any] | None = ...,
    cache_dir: str | None = ...,
) -> list[Example]: ...


@overload
def load_examples(
    source: str,
    split: str = ...,
    *,
    limit: int | None = ...,
    streaming: Literal[True],
    on_error: str = ...,
    fmt: str | None = ...,
    options: Mapping[str, Any] | None = ...,
    cache_dir: str | None = ...,
) -> Iterator[Example]: ...


def load_examples(
    source: str,
    split: str = "train",
    *,
    limit: int | None = None,
    streaming: bool = False,
    on_error: str = "raise",
    fmt: str | None = None,
    options: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> list[Example] | Iterator[Example]:
    """Examples of `split` of `source` (a registered name or a .jsonl/.json/.parquet path).

    limit: at most this many (valid) examples. streaming: return an iterator (hub
    datasets stream through `datasets`; JSONL is read line by line). on_error: "raise"
    stops at the first bad record with a `DataError`; "skip" drops bad records and logs
    the count (use `load_examples_report` to get it). fmt: the native field layout of a
    local file ("gsm8k", "svamp", ...; default: our schema). options: knobs of the
    generated datasets (synthetic: n, seed, n_ops, modulus, max_operand, ops, unique;
    gsm-symbolic: lang, seed, split_seed, n_per_template, test_fraction); they may also follow the
    name, as in ``"gsm-symbolic?n_per_template=50"`` (see `parse_source_options`). cache_dir:
    where hub datasets are cached (None: datasets' own, ``$HF_DATASETS_CACHE``).
    """
    if not streaming:
        return load_examples_report(
            source, split, limit=limit, on_error=on_error, fmt=fmt, options=options, cache_dir=cache_dir
        ).examples
    report = LoadReport()
    # Resolve the source now so that a bad name or path fails at the call, not at first use.
    examples = _stream(
        source,
        split,
        fmt=fmt,
        on_error=on_error,
        options=options,
        limit=limit,
        streaming=True,
        report=report,
        cache_dir=cache_dir,
    )
    return _logged(examples, source, split, report)


def _logged(examples: Iterator[Example], source: str, split: str, report: LoadReport) -> Iterator[Example]:
    yield from examples
    if report.skipped:
        log.warning("%s [%s]: skipped %d bad record(s); first: %s", source, split, report.skipped, report.errors[0])


# --------------------------------------------------------------------------- a run's data


def load_data(cfg: KavaConfig, which: str) -> list[Example]:
    """The training (``which="train"``) or evaluation examples named by ``cfg.data``."""
    # Kept whole (over 60 lines): the one path from a run's config to its examples, train and eval side by side.
    d = cfg.data
    source, split, limit = (
        (d.train, d.train_split, d.train_limit) if which == "train" else (d.eval, d.eval_split, d.eval_limit)
    )
    if d.format not in FORMATS and getattr(REGISTRY.get(d.format), "mapper", None) is None:  # whatever the source
        from kava.config import ConfigError

        known = [*FORMATS, *(n for n, s in REGISTRY.items() if s.mapper is not None and n not in FORMATS)]
        raise ConfigError(f"config field 'data.format': {d.format!r} is not one of {', '.join(known)}")
    if source in ("synthetic", "synthetic-nl"):
        from kava.data.synthetic import generate_split

        n = d.synthetic_train_size if split == "train" else d.synthetic_test_size
        examples = generate_split(
            split,
            n,
            seed=0,
            n_ops=d.synthetic_ops,
            modulus=d.synthetic_modulus,
            style="nl" if source.endswith("-nl") else "eq",
            test_size=d.synthetic_test_size,
        )
        return examples[:limit] if limit else examples
    if source in ("synthetic-products", "synthetic-products-nl"):
        from kava.data.synthetic import generate_products_split

        n = d.synthetic_train_size if split == "train" else d.synthetic_test_size
        examples = generate_products_split(
            split,
            n,
            seed=0,
            sizes=tuple(d.synthetic_sizes),
            modulus=d.synthetic_modulus,
            style="nl" if source.endswith("-nl") else "eq",
        )
        return examples[:limit] if limit else examples
    if source in ("synthetic-classes", "synthetic-classes-nl"):
        from kava.data.synthetic import generate_classes_split

        n = d.synthetic_train_size if split == "train" else d.synthetic_test_size
        examples = generate_classes_split(
            split,
            n,
            seed=0,
            sizes=tuple(d.synthetic_sizes),
            modulus=d.synthetic_modulus,
            style="verbose" if source.endswith("-nl") else "eq",
        )
        return examples[:limit] if limit else examples
    fmt = None if d.format == "auto" or source.split("?", 1)[0] in REGISTRY else d.format  # (files only)
    examples = list(
        load_examples(source, split, limit=limit or None, on_error=d.on_error, cache_dir=d.cache_dir or None, fmt=fmt)
    )
    if not examples:
        raise DataError(
            f"no {'training' if which == 'train' else 'evaluation'} examples (an empty file or split?)",
            where=f"data.{which}={source}",
        )
    return examples

"""The ``kava data`` command group: export, validate, list.

``register(subparsers)`` adds the group to an argparse subparsers object; every
subcommand sets ``func(args) -> int`` (the exit code). Data errors are printed as one
line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .types import count_int

__all__ = ["register"]


def _fail(err: Exception) -> int:
    print(f"kava data: error: {err}", file=sys.stderr)
    return 1


def _cmd_export(args: argparse.Namespace) -> int:
    from ..data import DataError, load_examples_report, write_jsonl
    from ..io import OutputError, check_output_file

    try:
        _check_export_out(args.source, args.out)
        check_output_file(args.out, "--out")
        report = load_examples_report(args.source, args.split, limit=args.limit, on_error=args.on_error, fmt=args.fmt)
        n = write_jsonl(report.examples, args.out)
    except (DataError, OutputError, ValueError, OSError, ImportError) as err:
        return _fail(err)
    skipped = f" ({report.skipped} bad record(s) skipped)" if report.skipped else ""
    print(f"wrote {n} records to {args.out}{skipped}")
    return 0


def _check_export_out(source: str, out: str) -> None:
    """``--out`` before any work: a path, and never the file being exported (it would be rewritten)."""
    from pathlib import Path

    from ..io import OutputError

    if not out.strip():
        raise OutputError("--out: empty; give the .jsonl file to write")
    src, dst = Path(source), Path(out)
    if src.is_file() and dst.exists() and src.resolve() == dst.resolve():
        raise OutputError(f"--out {out}: the file being exported; write to another file")


def _cmd_validate(args: argparse.Namespace) -> int:
    from ..data import DataError, validate_file

    try:
        n = validate_file(args.path, fmt=args.fmt)
    except (DataError, ValueError, OSError) as err:
        return _fail(err)
    print(f"{args.path}: {n} records OK")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from ..data import list_datasets

    del args
    for spec in list_datasets():
        where = spec.hub_id + (f" ({spec.config})" if spec.config else "") if spec.hub_id else spec.origin
        print(f"{spec.name:<22} {where:<32} splits: {', '.join(spec.splits)}")
        print(f"{'':<22} {spec.description}")
    print("Any local .jsonl, .json or .parquet file is accepted too (see `kava data validate`).")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``data`` command group (export, validate, list) to `subparsers`."""
    data = subparsers.add_parser("data", help="inspect, export and validate datasets")
    sub = data.add_subparsers(dest="data_command", metavar="{export,validate,list}", required=True)

    export = sub.add_parser("export", help="write a dataset split as JSONL in kava's schema")
    export.add_argument("source", metavar="SOURCE", help="registered dataset name (see `data list`) or local file")
    export.add_argument(
        "--split",
        default="train",
        help="split to export; which exist depends on SOURCE, see `data list` (default: train)",
    )
    export.add_argument("--limit", type=count_int, default=None, help="export at most N examples (default: all)")
    export.add_argument("--out", required=True, metavar="PATH", help="output .jsonl file (written atomically)")
    export.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="bad records: stop with an error (raise) or drop them and report the count (skip)",
    )
    export.add_argument(
        "--fmt",
        default=None,
        help="force the layout of a local SOURCE's records: kava, messages, prompt_completion, gsm8k, "
        "or a registered dataset's, e.g. svamp (default: recognised by each record's fields)",
    )
    export.set_defaults(func=_cmd_export)

    validate = sub.add_parser("validate", help="check every record of a local data file")
    validate.add_argument("path", metavar="PATH", help="a .jsonl, .json or .parquet file")
    validate.add_argument(
        "--fmt",
        default=None,
        help="force the records' layout: kava, messages, prompt_completion, gsm8k, or a registered "
        "dataset's, e.g. svamp (default: recognised by each record's fields)",
    )
    validate.set_defaults(func=_cmd_validate)

    lst = sub.add_parser("list", help="list the registered datasets")
    lst.set_defaults(func=_cmd_list)
    return data

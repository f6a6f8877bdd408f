"""``kava env``: report the machine and the settings a run would pick; optionally find the
largest batch that fits (``kava env --find-batch``)."""

from __future__ import annotations

import json


def cmd_env(args) -> int:
    from ..config import load_config
    from ..training.env import environment_report, format_report

    cfg = load_config(args.config, args.overrides)
    report = environment_report(cfg)
    if args.find_batch:
        from ..training.batch_finder import find_batch

        report["largest_batch"] = find_batch(cfg, args.max_batch)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if "largest_batch" in report:
            lb = report["largest_batch"]
            note = " (stopped at --max-batch, not at a memory limit)" if lb["hit_limit"] else ""
            print(f"largest batch {lb['largest']} per process{note}; tried {lb['tried']}")
    return 0


def register(subparsers) -> None:
    from .types import positive_int

    p = subparsers.add_parser("env", help="report devices, memory, library versions and the settings a run would pick")
    p.add_argument("--config", help="YAML config whose settings to resolve (default: the built-in defaults)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--find-batch",
        action="store_true",
        help="build the model and find the largest per-process batch whose training step fits in memory",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=512,
        help="largest batch to try with --find-batch (on a CPU this, not memory, is the limit)",
    )
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.gradient_checkpointing=true")
    p.set_defaults(func=cmd_env)

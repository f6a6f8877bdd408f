"""``kava report``: tables, plots and claim verdicts from a folder of runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _names(args: argparse.Namespace):
    from ..experiments.report import CLAIMS, ClaimNames

    if not 0 < args.alpha < 1:
        raise ValueError(f"--alpha {args.alpha}: must be between 0 and 1")
    if not 0 < args.success_at <= 1:  # (a NaN fails this too)
        raise ValueError(f"--success-at {args.success_at}: an accuracy, above 0 and at most 1")
    if args.claims is not None and not args.claims.strip(","):
        raise ValueError(f"--claims {args.claims!r}: give claim numbers, e.g. 1,4,5 (leave it out for all)")
    claims = tuple(c.strip() for c in args.claims.split(",") if c.strip()) if args.claims else ()
    known = [c.number for c in CLAIMS]
    unknown = [c for c in claims if c not in known]
    if unknown:
        raise ValueError(f"--claims {args.claims!r}: no claim {unknown[0]!r}; the claims are {', '.join(known)}")
    names = ClaimNames(mode=args.mode, alpha=args.alpha, success_at=args.success_at, claims=claims)
    roles = sorted(names.methods)
    given: dict[str, str] = {}
    for item in args.method:
        role, _, found = item.partition("=")
        role = role.strip()
        if not role or not found.strip(", "):
            raise ValueError(f"--method {item!r}: expected ROLE=NAME[,NAME...], e.g. kava=rkv")
        if role not in names.methods:
            raise ValueError(f"--method {item!r}: no role {role!r}; the roles are {', '.join(roles)}")
        if role in given:
            raise ValueError(f"--method {item!r}: role {role} is also set by {given[role]!r}; give each role once")
        given[role] = item
        names.methods[role] = tuple(n.strip() for n in found.split(",") if n.strip())
    for item in args.nl_pair:
        eq, sep, nl = item.partition(":")
        if not sep or not eq or not nl:
            raise ValueError(f"--nl-pair {item!r}: expected EQ_DATASET:NL_DATASET, e.g. synthetic:synthetic-nl")
        names.nl_pairs.append((eq, nl))
    return names


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; exit code 1 where no run folder was found, 2 for a bad flag."""
    from ..experiments.report import to_report_markdown, write_report

    try:
        names = _names(args)
    except ValueError as e:
        print(f"kava: error: {e}", file=sys.stderr)
        return 2
    try:
        report = write_report(args.runs_dir, args.out, names, heatmaps=args.heatmaps)
    except ValueError as e:  # a malformed file in a run folder: the message names it
        print(f"kava: error: {e}", file=sys.stderr)
        return 1
    if not report.runs:
        what = (
            f"{args.runs_dir}: no runs"
            if Path(args.runs_dir).is_file()
            else f"no run folders (with a status.json) under {args.runs_dir}"
        )
        print(f"kava: error: {what}", file=sys.stderr)
        return 1
    print(to_report_markdown(report.runs, report.rows, report.verdicts, names))
    print("written: " + ", ".join(str(f) for f in report.files))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kava report`` to the ``kava`` command."""
    p = subparsers.add_parser(
        "report",
        help="aggregate runs over seeds: CSV/Markdown/LaTeX tables, plots, claim verdicts",
        description="Collect every run folder (with a status.json) under RUNS_DIR, aggregate over seeds "
        "and write results.csv, results.md, results.tex, verdicts.json and plots. Given "
        "an earlier report's runs.csv instead, re-derive its results.md and "
        "verdicts.json from the per-seed accuracies (the run folders gone).",
    )
    p.add_argument(
        "runs_dir",
        metavar="RUNS_DIR",
        help="folder holding the runs, e.g. a sweep's output_dir; or a report's runs.csv",
    )
    p.add_argument("--out", default=None, help="output folder (default: RUNS_DIR/report; for a runs.csv, its folder)")
    p.add_argument(
        "--heatmaps",
        default="all",
        choices=("all", "first-seed", "none"),
        help="KV cosine heatmaps: one per run, one per name (its lowest seed), or none",
    )
    p.add_argument(
        "--mode", default="student", choices=("student", "cot", "nocot"), help="eval mode the claims are checked on"
    )
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="ROLE=NAME[,NAME]",
        help="which method names play a role in the claims (roles: codi, kava, right_crop, mean_pool, shuffled, "
        "slot_mean, counterfactual); "
        "repeatable, e.g. --method kava=rkv_M8",
    )
    p.add_argument(
        "--nl-pair",
        action="append",
        default=[],
        metavar="EQ:NL",
        help="an equation/natural-language dataset pair for claim 4 (default: every X-nl with its X); repeatable",
    )
    p.add_argument(
        "--claims",
        default=None,
        metavar="N[,N]",
        help="test only these claims (e.g. 1,4,5, the ones a pre-registration names; default: all of them)",
    )
    p.add_argument("--alpha", type=float, default=0.05, help="one-sided level every claim is tested at (default 0.05)")
    p.add_argument(
        "--success-at",
        type=float,
        default=0.9,
        metavar="ACC",
        help="accuracy (a fraction) from which a seed counts as a success, for the success rates (default 0.9)",
    )
    p.set_defaults(func=cmd_report)

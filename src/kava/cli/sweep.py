"""``kava sweep``: expand a sweep file and run it here, submit it to SLURM, or write a PBS script."""

from __future__ import annotations

import argparse
import fnmatch
import sys

from .types import count_int, positive_int

MAX_SEED_RANGE = 100_000  # seeds one --seeds range may span (a filter over the sweep's seeds)


def parse_seeds(text: str) -> set[int]:
    """``0,3,5-9`` -> {0, 3, 5, 6, 7, 8, 9}; anything else is a one-line error."""
    from ..experiments.sweep import SweepError

    out: set[int] = set()
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise SweepError(f"--seeds {text!r}: expected seeds and ranges such as 0,3,5-9") from None
        if b < a:
            raise SweepError(f"--seeds {text!r}: range {part.strip()} runs backwards")
        if b - a >= MAX_SEED_RANGE:
            raise SweepError(f"--seeds {text!r}: range {part.strip()} spans more than {MAX_SEED_RANGE:,} seeds")
        out.update(range(a, b + 1))
    return out


def _selected_runs(args: argparse.Namespace) -> list:
    """The sweep's runs that ``--only`` and ``--seeds`` select, in ``--by-seed`` order if asked;
    job-script options checked first (:class:`SweepError` naming the flag)."""
    from ..experiments.sweep import SweepError, expand_sweep

    for flag, text in (("--queue", args.queue), ("--partition", args.partition), ("--setup", args.setup)):
        if not text.isprintable():  # one line each in a job script: a newline would add directives
            raise SweepError(f"{flag} {text!r}: holds a newline or control character; give one line")
    specs = expand_sweep(args.sweep, validate=True, extra=args.set, output_dir=args.output_dir)
    if args.only:
        specs = [s for s in specs if any(fnmatch.fnmatchcase(s.name, pat) for pat in args.only)]
        if not specs:
            raise SweepError(f"no run name matches {', '.join(args.only)}")
    if args.seeds:
        wanted = parse_seeds(args.seeds)
        specs = [s for s in specs if s.seed in wanted]
        if not specs:
            raise SweepError(f"--seeds {args.seeds}: no run of the sweep has these seeds")
    if args.by_seed:
        specs = sorted(specs, key=lambda s: s.seed)  # stable: file order within a seed
    return specs


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run, submit or list the sweep; the exit code is non-zero if a local run failed."""
    from ..experiments.cluster import submit_slurm, write_pbs
    from ..experiments.sweep import SweepError, describe, run_local

    try:
        specs = _selected_runs(args)
        if args.slurm and args.pbs:
            raise SweepError("--slurm and --pbs exclude each other")
        resume = not args.no_resume
        if args.dry_run:
            print(describe(specs))
            print(f"{len(specs)} run(s)")
            return 0
        if args.slurm:
            jobs = submit_slurm(
                specs,
                partition=args.partition,
                gpus_per_job=args.gpus,
                time_min=args.time,
                cpus=args.cpus,
                mem_gb=args.mem_gb,
                array_parallelism=args.array_parallelism,
                executor=args.executor,
                resume=resume,
            )
            print(f"submitted {len(jobs)} job(s): {' '.join(str(j.job_id) for j in jobs)}")
            return 0
        if args.pbs:
            script = write_pbs(
                specs,
                args.pbs,
                queue=args.queue,
                gpus=args.gpus,
                walltime=args.time,
                cpus=args.cpus,
                mem_gb=args.mem_gb,
                setup=args.setup,
                resume=resume,
            )
            print(f"wrote {script}; submit it with: qsub {script}")
            return 0
        summary = run_local(specs, resume=resume, overwrite=args.overwrite)
        print(summary)
        return summary.exit_code
    except SweepError as e:
        print(f"kava: error: {e}", file=sys.stderr)
        return 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kava sweep`` to the ``kava`` command."""
    # Kept whole (over 60 lines): the sweep command's flags, one after another, as --help lists them.
    p = subparsers.add_parser(
        "sweep",
        help="run many trainings from a sweep YAML (here, on SLURM or on PBS)",
        description="Expand SWEEP.yaml (base_config, output_dir, seeds, grid, runs, overrides; "
        "see kava.sweep) and run it. Finished runs are skipped, unfinished ones resumed.",
    )
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file")
    p.add_argument("--dry-run", action="store_true", help="list the runs, their state and overrides; run nothing")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="run only names matching this glob (repeatable), e.g. --only 'rkv*'",
    )
    p.add_argument("--seeds", metavar="LIST", help="run only these seeds, e.g. 0-4 or 0,2,5-9")
    p.add_argument(
        "--by-seed",
        action="store_true",
        help="run every name's seed 0 first, then seed 1, ...: "
        "an interrupted sweep leaves all arms with the same seeds",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override applied to every run after the sweep's own values (repeatable), "
        "e.g. --set train.max_steps=2 for a smoke test",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="put the run folders under DIR instead of the sweep's output_dir (use it with --set)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start every run from scratch (refused where a run folder already holds a run)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="run afresh (deleting its files) a run whose folder holds a config other than the sweep's now; "
        "without it such a sweep stops before running anything",
    )
    g = p.add_argument_group("SLURM (through submitit: pip install submitit)")
    g.add_argument(
        "--slurm", action="store_true", help="submit the unfinished runs as a job array instead of running them here"
    )
    g.add_argument(
        "--executor",
        choices=("slurm", "local", "debug"),
        default="slurm",
        help="submitit executor: slurm, or local/debug to try the submission path on this machine",
    )
    g.add_argument("--partition", default="", help="SLURM partition (default: the cluster's)")
    g.add_argument("--array-parallelism", type=positive_int, default=64, help="at most this many array jobs at once")
    g = p.add_argument_group("PBS")
    g.add_argument(
        "--pbs",
        metavar="DIR",
        help="write a PBS job-array script (and each run's config.yaml) to DIR instead of running",
    )
    g.add_argument("--queue", default="", help="PBS queue (-q)")
    g.add_argument(
        "--setup", default="", help="shell line run before training in the PBS script, e.g. 'source .venv/bin/activate'"
    )
    g = p.add_argument_group("resources (SLURM and PBS)")
    g.add_argument("--gpus", type=count_int, default=1, help="GPUs per run")
    g.add_argument("--time", type=positive_int, default=600, help="time limit per run in minutes")
    g.add_argument("--cpus", type=positive_int, default=8, help="CPU cores per run")
    g.add_argument("--mem-gb", type=positive_int, default=64, help="memory per run in GB")
    p.set_defaults(func=cmd_sweep)

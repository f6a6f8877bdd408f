"""The ``kava`` command: it only parses arguments and calls the library.

This module holds the top-level commands (train, eval, demo, config) and :func:`main`; each
command group has its module beside it (``data``, ``sweep``, ``report``, ``env``,
``teacher``, ``export``: export and lm-eval), registered by :func:`build_parser`. Parsing
imports nothing heavy (no torch, transformers, datasets, peft or accelerate): each command imports what it needs when it
runs, so ``kava --help`` and ``kava CMD --help`` are quick. CLI layer: may import every
layer below it.
"""

from __future__ import annotations

import argparse
import sys

from ..logs import setup_logging, survive_closed_pipes
from .types import count_int, positive_int  # noqa: F401  (argparse types of the subcommands)


def cmd_train(args) -> int:
    from ..config import load_config
    from ..training.loop import train
    from ..training.rundir import resume_config

    overrides = [*args.overrides, *(["train.overwrite_output_dir=true"] if args.overwrite else [])]
    # --resume continues with the run's own config.yaml (the overrides it was started with need
    # not be repeated); the overrides given now go on top and are checked by the trainer.
    cfg = resume_config(args.config, overrides) if args.resume else load_config(args.config, overrides)
    result = train(cfg, resume=args.resume)
    print(f"{result['state']}: step {result['step']}/{result['max_steps']}, checkpoint {result['checkpoint']}")
    for mode, r in result.get("eval", {}).items():
        print(f"eval {mode}: accuracy {r['accuracy']:.3f}, forward passes {r['forward_passes']:.2f}, n={r['n']}")
    # Stopped by a signal (after saving): the shell's convention, 128 + the signal's number,
    # so `kava train && kava eval` and schedulers do not read it as success.
    return 128 + int(result["signal"]) if result.get("signal") else 0


def cmd_eval(args) -> int:
    import json

    from ..evaluation.evaluator import evaluate_checkpoint

    extra = list(args.overrides)
    if args.data:
        extra.append(f"data.eval={args.data}")
    if args.split:
        extra.append(f"data.eval_split={args.split}")
    if args.limit:
        extra.append(f"data.eval_limit={args.limit}")
    modes = [m.strip() for m in args.modes.split(",")] if args.modes is not None else None
    if args.model:
        from ..evaluation.evaluator import evaluate_pretrained

        if not (args.config or args.data):
            # The defaults would read the synthetic chains without a chat template: no baseline of anything.
            print(
                "kava: error: kava eval --model: give --config FILE (the data, prompt and decoding of the runs to "
                "compare with) or --data NAME_OR_FILE (e.g. --data synthetic for the default data)",
                file=sys.stderr,
            )
            return 2

        res, out = evaluate_pretrained(args.model, args.config, extra, modes, args.out)
    else:
        res, out = evaluate_checkpoint(args.checkpoint, extra, modes, args.out)
    print(json.dumps(res, indent=2))
    print(f"predictions and metrics written to {out}")
    return 0


def cmd_demo(args) -> int:
    from ..config import under_output_root
    from ..experiments.demo import run_demo

    run_demo(under_output_root(args.out), quick=args.quick, threads=args.threads, seed=args.seed, jobs=args.jobs)
    return 0


def cmd_config(args) -> int:
    from ..config import ConfigError, help_lines, load_config

    if args.overrides and not args.show:
        raise ConfigError(f"kava config: overrides ({args.overrides[0]}) apply to a file given with --show FILE")
    if args.show:
        import yaml

        print(yaml.safe_dump(load_config(args.show, args.overrides).to_dict(), sort_keys=False))
    else:
        print("\n".join(help_lines()))
    return 0


class _Once(argparse.Action):
    """An option that may be given once: a second value is refused, not silently preferred."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}); give it once")
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    # Kept whole (over 60 lines): the command line read top to bottom, one subcommand after another.
    p = argparse.ArgumentParser(prog="kava", description="Latent reasoning by compressed KV-cache distillation (KaVa).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (kava, cot or nocot mode)")
    t.add_argument("--config", action=_Once, help="YAML config file (see configs/)")
    from ..config import RESUME_MAY_CHANGE

    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in train.output_dir with the run's own config.yaml and the "
        "overrides given now; a field that changes the result is refused. What may change: "
        + ", ".join(f + "*" if f.endswith(".") else f for f in RESUME_MAY_CHANGE)
        + "; train.max_steps and train.epochs under a constant schedule whose warm-up keeps its number of "
        "steps (train.warmup_steps, none, or a train.warmup_ratio of train.max_steps that gives as many)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a train.output_dir that holds another run, deleting its files (= "
        "train.overwrite_output_dir=true)",
    )
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-3 latent.scheme=sequential")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint, or a plain model (an untrained baseline)")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    which.add_argument(
        "--model",
        help="a plain model with no kava checkpoint: a transformers folder, hub id or .gguf file (modes cot, nocot)",
    )
    e.add_argument(
        "--config",
        action=_Once,
        help="with --model: YAML config for the data, prompt and decoding (--model needs it or --data)",
    )
    e.add_argument("--data", help="dataset name or local file (default: the run's data.eval)")
    e.add_argument("--split", help="split of --data")
    e.add_argument("--limit", type=count_int, default=0, help="first N examples only")
    e.add_argument("--modes", help="comma-separated: student, cot, nocot (default: the run's own mode)")
    e.add_argument(
        "--out",
        help="folder for predictions and metrics (default: CHECKPOINT/eval/DATA-SPLIT[-LIMIT], "
        "or runs/eval/NAME/DATA-SPLIT[-LIMIT] with --model)",
    )
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.batch_size=16")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser(
        "demo", help="the embedded CPU demo: CoT, no-CoT, CODI and KaVa (the paper's recipe) on sums of products"
    )
    d.add_argument(
        "--out", default="runs/demo", help="output folder (a relative one goes under $KAVA_OUTPUT_ROOT when set)"
    )
    d.add_argument("--quick", action="store_true", help="a much shorter run (for smoke tests; accuracies mean little)")
    d.add_argument("--threads", type=positive_int, default=1, help="CPU threads for each training process")
    d.add_argument(
        "--jobs", type=int, choices=(1, 2), default=None, help="runs side by side (default: cores / threads, at most 2)"
    )
    d.add_argument("--seed", type=count_int, default=0, help="seed of every run")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("config", help="list every config field with its default and help, or show a resolved config")
    c.add_argument("--show", metavar="FILE", action=_Once, help="print FILE resolved with defaults and overrides")
    c.add_argument("overrides", nargs="*", help="key=value overrides")
    c.set_defaults(func=cmd_config)

    from . import data, env, export, report, sweep, teacher

    for group in (data, sweep, report, env, teacher, export):
        group.register(sub)
    return p


# Errors printed as one line ``kava: error: ...`` instead of a traceback, by defining module.
_ONE_LINE_ERRORS = (
    ("kava.config", "ConfigError"),
    ("kava.io", "OutputError"),
    ("kava.data.schema", "DataError"),
    ("kava.model.files", "ModelLoadError"),
    ("kava.data.sequences", "SequenceError"),
    ("kava.training.errors", "TrainingError"),
    ("kava.training.rundir", "RunFolderError"),
)


def one_line_errors() -> tuple[type[BaseException], ...]:
    """The error classes `main` prints as one line: OSError and those of
    :data:`_ONE_LINE_ERRORS` whose module is loaded. An error whose module was never imported
    cannot have been raised, so this imports nothing (a command may not need torch)."""
    loaded = (getattr(sys.modules[module], name, None) for module, name in _ONE_LINE_ERRORS if module in sys.modules)
    # OSError: what the machine refused (permission denied, a full or read-only disk); its
    # message names the file.
    return (OSError, *(cls for cls in loaded if cls is not None))


def exit_code(error: BaseException) -> int:
    """2 for a bad configuration, 1 for any other one-line error."""
    config = sys.modules.get("kava.config")
    return 2 if config is not None and isinstance(error, config.ConfigError) else 1


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the command itself: a closed stdout or stderr (`kava train | head`) must not stop it
        survive_closed_pipes()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"] and argv[1:] not in (["-h"], ["--help"]):
        # Every argument after it is lm-eval's, options included (argparse would read them as kava's).
        from .export import cmd_lm_eval

        args = argparse.Namespace(verbose=False, func=cmd_lm_eval, harness_args=argv[1:])
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # key=value overrides are accepted after options too (`kava train --config C --resume train.lr=1e-3`).
        if hasattr(args, "overrides"):
            args.overrides = [*args.overrides, *(x for x in extra if "=" in x and not x.startswith("-"))]
            extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    setup_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except one_line_errors() as e:
        print(f"kava: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and records it itself)
        print(
            "kava: error: interrupted (SIGINT); outputs are written atomically, none is half-written", file=sys.stderr
        )
        return 128 + 2

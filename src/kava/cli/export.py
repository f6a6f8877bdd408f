"""``kava export`` (a checkpoint as a plain transformers folder with a model card, optionally
pushed to the hub) and ``kava lm-eval`` (lm-evaluation-harness with the ``kava`` model)."""

from __future__ import annotations

import argparse
import sys


def cmd_export(args: argparse.Namespace) -> int:
    from ..model.export import check_push_target, export, push_to_hub

    if args.push_to_hub:  # before the export: a push that cannot happen is said at once
        check_push_target(args.push_to_hub)
    out = export(
        args.checkpoint, args.out, trust_remote_code=args.trust_remote_code, replace=args.replace, dtype=args.dtype
    )
    print(f"exported {args.checkpoint} to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    if args.push_to_hub:
        print(f"pushed to {args.push_to_hub}: {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from ..evaluation.harness import run_cli
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        print(
            "kava: error: kava lm-eval needs lm-evaluation-harness: pip install 'kava-latent[lm-eval]'", file=sys.stderr
        )
        return 1
    return run_cli(args.harness_args)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``kava export`` and ``kava lm-eval`` to the ``kava`` command."""
    x = subparsers.add_parser(
        "export",
        help="write a checkpoint as a merged, plain transformers model folder with a model card",
        description="Merges any LoRA into the backbone and writes config.json, model.safetensors, the tokenizer (with "
        "<bot>/<eot>), kava_model.safetensors (the latent projection), kava_config.yaml and README.md "
        "(a model card with the recipe, data and the evaluation found beside the checkpoint).",
    )
    x.add_argument("checkpoint", help="checkpoint folder, or a run folder (its latest checkpoint)")
    x.add_argument("--out", required=True, help="folder to write (atomically); must be empty or new, unless --replace")
    x.add_argument(
        "--replace",
        action="store_true",
        help="replace an earlier export in --out (refused if it holds files an export does not write)",
    )
    x.add_argument(
        "--push-to-hub", metavar="REPO", help="then upload the folder to this hub model repo (huggingface_hub)"
    )
    x.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bfloat16", "float16", "float32"),
        help="dtype of the merged weights (auto: the base model's own, from its config.json, else the checkpoint's)",
    )
    x.add_argument("--private", action="store_true", help="create the hub repo as private")
    x.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code shipped with the base model to run (a checkpoint cannot allow it by itself)",
    )
    x.set_defaults(func=cmd_export)

    h = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the kava model registered (arguments go to lm-eval)",
        description="Runs `lm-eval ARGS` with `--model kava` available, e.g. kava lm-eval --model kava "
        "--model_args pretrained=DIR --tasks TASK --include_path TASKS_DIR. model_args: pretrained, "
        "mode (latent, cot, nocot), answer_prefix (true/false), grader. `lm-eval --help` lists lm-eval's arguments.",
    )
    h.add_argument("harness_args", nargs=argparse.REMAINDER, help="arguments of lm-eval (see lm-eval --help)")
    h.set_defaults(func=cmd_lm_eval)

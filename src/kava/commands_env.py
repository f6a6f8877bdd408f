"""``kava env``: report the machine and the settings a run would pick; optionally find the
largest batch that fits (``kava env --find-batch``)."""

from __future__ import annotations

import json
from contextlib import nullcontext


def cmd_env(args) -> int:
    from .config import load_config
    from .env import environment_report, format_report

    cfg = load_config(args.config, args.overrides)
    report = environment_report(cfg)
    if args.find_batch:
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


def find_batch(cfg, max_batch: int) -> dict:
    """Build the configured model and search the largest per-process training batch."""
    import torch

    from .batch_finder import find_largest_batch, training_step_fn
    from .model.backbone import build_model
    from .distill.objective import Objective
    from .data.sequences import TextEncoder
    from .data.loaders import load_data
    from .train import pick_mixed_precision

    if cfg.data.train_limit == 0 and cfg.data.train in ("synthetic", "synthetic-nl"):
        cfg.data.synthetic_train_size = min(cfg.data.synthetic_train_size, 2000)
    model = build_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    encoded = [encoder.encode(ex) for ex in load_data(cfg, "train")]
    objective = Objective(model, cfg).train()
    at_step = 10**9 if cfg.curriculum.enabled else 0  # the last curriculum stage: all latents
    mp = pick_mixed_precision(cfg.train.mixed_precision)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    step = training_step_fn(objective, encoded, at_step=at_step)

    def run(b: int) -> None:
        with torch.autocast(device.type, dtype=amp) if amp is not None and device.type == "cuda" else nullcontext():
            step(b)

    res = find_largest_batch(run, start=1, max_batch=max_batch)
    return {"largest": res.largest, "hit_limit": res.hit_limit, "tried": res.tried, "device": device.type}


def register(subparsers) -> None:
    p = subparsers.add_parser("env", help="report devices, memory, library versions and the settings a run would pick")
    p.add_argument("--config", help="YAML config whose settings to resolve (default: the built-in defaults)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--find-batch", action="store_true",
                   help="build the model and find the largest per-process batch whose training step fits in memory")
    p.add_argument("--max-batch", type=int, default=512,
                   help="largest batch to try with --find-batch (on a CPU this, not memory, is the limit)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model.gradient_checkpointing=true")
    p.set_defaults(func=cmd_env)

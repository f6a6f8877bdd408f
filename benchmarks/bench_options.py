"""What a config option does to kava's training step: the step with and without it, side by side.

For each ``--option KEY=VALUE`` (repeatable), two models are built from the same seed on the same
backbone (``--model tiny`` or ``medium``, as in ``bench_peers.py``): the base (``--config`` with
``--shape``'s batch, M and T, and any trailing overrides) and the base with the option. Both run
``kava.distill.Objective`` forward + backward on the same batch, interleaved (rounds AB BA ...),
after ``--warmup`` untimed rounds. Printed per option: the first step's time of each arm (what a
compiler costs up front), the median ms per example, the median over rounds of option / base with
a 95% bootstrap interval, and the largest difference in loss between the two arms on the same
batch (an option that changes the maths shows there).

  python benchmarks/bench_options.py --option model.compile=mlp --option model.attn_implementation=eager
  python benchmarks/bench_options.py --model medium --shape 16x12x6 --option model.compile=mlp --clock cpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peers import MODELS, QUICK, _shapes, build_model, kava_config, make_examples, median_ratio  # noqa: E402
from bench_step import interleaved_times, machine, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _arm(cfg, model, encs, device):
    """A forward + backward of the objective on the batch of ``encs``; returns (step, loss of one call)."""
    from kava.data.sequences import to_device
    from kava.distill import Objective

    objective = Objective(model, cfg).train()
    batch = objective.make_batch(encs, 0)
    batch = {**batch, "teacher": to_device(batch["teacher"], device), "student": to_device(batch["student"], device)}
    params = [p for p in (*model.parameters(), *objective.parameters()) if p.requires_grad]

    def step() -> float:
        loss = objective(batch)[0]
        loss.backward()
        for p in params:
            p.grad = None
        return float(loss.detach())

    return step


def compare(option: str, args, device, dtype) -> dict:
    shape = args.shape
    base_cfg = kava_config(args.config, shape, args.overrides)
    option_cfg = kava_config(args.config, shape, [*args.overrides, option])
    models = {"base": build_model(base_cfg, MODELS[args.model], device, dtype)}
    models["option"] = build_model(option_cfg, MODELS[args.model], device, dtype)
    encs = make_examples(
        models["base"], base_cfg, shape.batch, args.question_tokens, shape.cot, args.step_tokens, args.answer_tokens
    )
    steps = {
        "base": _arm(base_cfg, models["base"], encs, device),
        "option": _arm(option_cfg, models["option"], encs, device),
    }
    first, losses = {}, {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        losses[name] = step()
        sync(device)
        first[name] = time.perf_counter() - t0
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_times(steps, args.warmup, args.iters, device, alternate=True, clock=clock)
    med, lo, hi = median_ratio(times["option"], times["base"])
    return {
        "option": option,
        "first_step_s": first,
        "ms_per_example": {k: statistics.median(v) * 1e3 / shape.batch for k, v in times.items()},
        "ratio": {"median": med, "low": lo, "high": hi},
        "loss_difference": abs(losses["option"] - losses["base"]),
    }


def report(r: dict) -> str:
    m, s = r["machine"], r["shape"]
    where = m.get("gpu") or f"{m['cpus']} CPU cores, {m['torch_threads']} torch thread(s)"
    lines = [
        f"kava step with and without an option: model {r['model']}, B={s['batch']} C={s['cot']} M={s['latents']} "
        f"T={s['iterations']}, {r['dtype']}; forward + backward, median of {r['rounds']} interleaved rounds "
        f"({r['clock']} time); {where}, torch {m['torch']}",
        "",
        "| option | first step base / option (s) | base ms/ex | option ms/ex | option / base | max loss difference |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["results"]:
        f, ms, q = c["first_step_s"], c["ms_per_example"], c["ratio"]
        lines.append(
            f"| `{c['option']}` | {f['base']:.2f} / {f['option']:.2f} | {ms['base']:.2f} | {ms['option']:.2f} | "
            f"**{q['median']:.2f}** [{q['low']:.2f}, {q['high']:.2f}] | {c['loss_difference']:.1e} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--option", action="append", required=True, help="KEY=VALUE, the option under test (repeatable)")
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--shape", type=lambda t: _shapes(t)[0], default=QUICK, help="BxCxM or BxCxMxT (default 16x12x6)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny" / "kava.yaml"))
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each runs both arms once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds after the first step")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="cpu: this process's CPU time")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--step-tokens", type=int, default=6)
    p.add_argument("--answer-tokens", type=int, default=3)
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("overrides", nargs="*", help="kava config overrides key=value for both arms")
    args = p.parse_args(argv)
    for o in args.option:
        if "=" not in o:
            p.error(f"--option {o!r}: give KEY=VALUE")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    info = machine(device)
    info.pop("load_average", None)
    r = {
        "machine": info,
        "model": args.model,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": asdict(args.shape),
        "clock": args.clock,
        "rounds": args.iters,
        "results": [compare(o, args, device, dtype) for o in args.option],
    }
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()

"""``kava demo``: the whole method on the embedded task, on a laptop CPU, in minutes.

1. a CoT base (teacher) and, beside it, a no-CoT baseline trained from scratch;
2. two latent students started from the CoT base, identical but for the KV loss:
   CODI-only (``alpha_kv = 0``) and KaVa (R-KV compressed KV distillation);
3. a table of accuracy and forward passes, ``summary.json``, ``results.md`` and a plot.

Runs in pairs on two processes (one thread each). The recipes are ``configs/tiny/*.yaml``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..config import load_config
from ..io import atomic_write, atomic_write_json

log = logging.getLogger("kava.demo")  # the name its log lines have always had

CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "tiny"  # src/kava/experiments/demo.py -> the repository
ROWS = [("cot", "CoT teacher"), ("no_cot", "no-CoT"), ("codi", "CODI-only (alpha2 = 0)"), ("kava", "KaVa (R-KV)")]


def _overrides(name: str, out: Path, threads: int, quick: bool, init_from: str = "") -> list[str]:
    o = [f"train.output_dir={out / name}", f"train.num_threads={threads}", "train.progress=false"]
    o.append("train.overwrite_output_dir=true")  # a demo re-run trains its four models afresh
    if init_from:
        o.append(f"model.init_from={init_from}")
    if quick:
        o += ["train.max_steps=20", "data.synthetic_train_size=2000", "data.synthetic_test_size=50", "curriculum.steps_per_stage=5", "train.log_every=5"]
    return o


def _train_one(args: tuple[str, str, list[str]]) -> dict:
    import torch

    from ..logs import setup_logging
    from ..training.loop import train

    name, cfg_file, overrides = args
    setup_logging(False)
    cfg = load_config(cfg_file, overrides)
    torch.set_num_threads(cfg.train.num_threads or 1)
    start = time.perf_counter()
    result = train(cfg)
    result["wall_s"] = time.perf_counter() - start
    return result


def _run_pair(jobs: list[tuple[str, str, list[str]]], parallel: bool) -> list[dict]:
    if not parallel:
        return [_train_one(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=get_context("spawn")) as pool:
        return list(pool.map(_train_one, jobs))


def run_demo(out: Path, quick: bool = False, threads: int = 0) -> dict:
    """Train the four models and write the summary; returns ``summary.json``'s content."""
    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"{CONFIG_DIR}: the demo recipes live in the repository's configs/tiny")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cores = threads or os.cpu_count() or 1
    parallel = cores >= 2
    per_job = max(1, cores // 2) if parallel else cores
    cfg = lambda n: str(CONFIG_DIR / f"{n}.yaml")  # noqa: E731
    started = time.perf_counter()
    log.info("demo: training the CoT base and the no-CoT baseline")
    cot, nocot = _run_pair([("cot", cfg("cot"), _overrides("cot", out, per_job, quick)),
                            ("nocot", cfg("nocot"), _overrides("nocot", out, per_job, quick))], parallel)
    log.info("demo: training CODI-only and KaVa students from the CoT base")
    base = cot["checkpoint"]
    codi, kava = _run_pair([("codi", cfg("codi"), _overrides("codi", out, per_job, quick, base)),
                            ("kava", cfg("kava"), _overrides("kava", out, per_job, quick, base))], parallel)
    results = {"cot": (cot, "cot"), "no_cot": (nocot, "nocot"), "codi": (codi, "student"), "kava": (kava, "student")}
    methods = {}
    for key, (res, mode) in results.items():
        ev = res["eval"][mode]
        methods[key] = {
            "accuracy": ev["accuracy"], "forward_passes": ev["forward_passes"], "n": ev["n"],
            "kv_cache_bytes": ev["kv_cache_bytes"], "train_steps": res["step"], "train_wall_s": round(res["wall_s"], 1),
            "run_dir": str(out / ("nocot" if key == "no_cot" else key)),
        }
    summary = {"methods": methods, "wall_s": round(time.perf_counter() - started, 1), "quick": quick}
    atomic_write_json(out / "summary.json", summary)
    table = markdown_table(methods)
    atomic_write(out / "results.md", lambda p: p.write_text(table + "\n"))
    plot(methods, out / "accuracy_vs_passes.png")
    print(table)
    print(f"\ntotal wall time {summary['wall_s']:.0f} s; summary in {out / 'summary.json'}")
    return summary


def markdown_table(methods: dict) -> str:
    lines = ["| method | accuracy | forward passes | KV cache / example | train steps | train wall |", "|---|---|---|---|---|---|"]
    for key, label in ROWS:
        m = methods[key]
        lines.append(
            f"| {label} | {100 * m['accuracy']:.1f}% | {m['forward_passes']:.1f} | {m['kv_cache_bytes'] / 1024:.1f} KiB "
            f"| {m['train_steps']} | {m['train_wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in ROWS:
        m = methods[key]
        ax.scatter(m["forward_passes"], 100 * m["accuracy"], s=60, label=label)
    ax.set_xlabel("forward passes per example")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("kava demo: synthetic task, tiny Llama")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


__all__ = ["run_demo", "markdown_table"]

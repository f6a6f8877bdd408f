"""``kava demo``: the paper's recipe on the embedded testbed, on a laptop CPU, in minutes.

The task is sums of products mod 10 (``synthetic-products``, see :mod:`kava.data.synthetic`),
with questions of one and two products; the recipes are ``configs/tiny/*.yaml``:

1. beside each other: the CoT model (CE on question, chain of thought and answer) followed by
   the teacher's warm-up (the same model trained further on the KaVa teacher's own sequence,
   the chain without its last step), and a no-CoT baseline (question -> answer);
2. beside each other, both from the warmed-up teacher and identical but for the KV loss:
   **CODI** (PCCoT Jacobi latents, the CODI loss and the teacher's CE) and **KaVa** (CODI plus
   the R-KV compressed KV loss);
3. a table of accuracy (strict grader, overall and per number of products) and forward passes,
   ``summary.json`` (with the seed and each arm's recipe), ``results.md`` and a plot.

Each process runs one thread by default, so the result does not depend on the machine's core
count; ``--threads`` changes that. The two runs of a stage go side by side when the cores allow
(``--jobs``, by default the core count divided by the threads, at most 2), else one after the other:
the result is the same either way, as each run is seeded and single-process.
"""

from __future__ import annotations

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
# (summary key, table label, run folder, evaluated mode)
ROWS = [
    ("cot", "CoT", "cot", "cot"),
    ("no_cot", "no-CoT", "nocot", "nocot"),
    ("codi", "CODI (Jacobi latents, CODI loss, no KV loss)", "codi", "student"),
    ("kava", "KaVa (CODI + R-KV KV loss)", "kava", "student"),
]
TEACHER_ROW = ("teacher", "teacher warm-up (its CoT without the last step)", "teacher", "cot")
# The recipe fields summary.json records for each arm (the full config is in each run folder).
RECIPE_FIELDS = {
    "train": ("mode", "max_steps", "lr", "batch_size", "seed"),
    "latent": ("scheme", "num_latents", "iterations"),
    "loss": ("alpha_codi", "alpha_kv", "teacher_ce", "latent_ce", "compression", "drop_last_step"),
    "curriculum": ("enabled",),
}
QUICK = ["train.max_steps=12", "data.synthetic_train_size=400", "data.synthetic_test_size=40", "train.log_every=4"]


def _overrides(name: str, out: Path, threads: int, seed: int, quick: bool, init_from: str = "") -> list[str]:
    o = [f"train.output_dir={out / name}", f"train.num_threads={threads}", "train.progress=false", f"train.seed={seed}"]
    o.append("train.overwrite_output_dir=true")  # a demo re-run trains its models afresh
    if init_from:
        o.append(f"model.init_from={init_from}")
    return o + (QUICK if quick else [])


def _train_chain(chain: list[tuple[str, list[str]]]) -> list[dict]:
    """Train each (config file, overrides) in order, each from the previous one's last checkpoint."""
    import torch

    from ..logs import setup_logging
    from ..training.loop import train

    setup_logging(False)
    results: list[dict] = []
    for cfg_file, overrides in chain:
        if results:
            overrides = [*overrides, f"model.init_from={results[-1]['checkpoint']}"]
        cfg = load_config(cfg_file, overrides)
        torch.set_num_threads(cfg.train.num_threads or 1)
        start = time.perf_counter()
        result = train(cfg)
        result["wall_s"] = time.perf_counter() - start
        result["recipe"] = {
            part: {k: getattr(getattr(cfg, part), k) for k in keys} for part, keys in RECIPE_FIELDS.items()
        }
        result["config_file"] = cfg_file
        results.append(result)
    return results


def _run_side_by_side(chains: list[list[tuple[str, list[str]]]], parallel: bool) -> list[list[dict]]:
    if not parallel:
        return [_train_chain(c) for c in chains]
    with ProcessPoolExecutor(max_workers=len(chains), mp_context=get_context("spawn")) as pool:
        return list(pool.map(_train_chain, chains))


def _method(result: dict, mode: str, run_dir: Path) -> dict:
    ev = result["eval"][mode]
    return {
        "accuracy": ev["accuracy"],
        "n": ev["n"],
        "by_products": {
            _PRODUCTS[k]: v["accuracy"] for k, v in sorted(ev.get("by_cot_steps", {}).items()) if k in _PRODUCTS
        },
        "forward_passes": ev["forward_passes"],
        "kv_cache_bytes": ev["kv_cache_bytes"],
        "train_steps": result["step"],
        "train_wall_s": round(result["wall_s"], 1),
        "config": result["config_file"],
        "recipe": result["recipe"],
        "run_dir": str(run_dir),
    }


# by_cot_steps keys of synthetic-products: a*b+c has 2 steps, k >= 2 products 2k - 1.
_PRODUCTS = {"2": "1", "3": "2", "5": "3", "7": "4"}


def default_jobs(threads: int) -> int:
    """How many runs go side by side: as many as the cores hold at ``threads`` each, 1 or 2."""
    return max(1, min(2, (os.cpu_count() or 1) // max(1, threads)))


def run_demo(out: Path, quick: bool = False, threads: int = 1, seed: int = 0, jobs: int | None = None) -> dict:
    """Train the models and write the summary; returns ``summary.json``'s content.

    ``jobs`` (1 or 2) is how many runs train side by side; by default :func:`default_jobs`.
    """
    if not CONFIG_DIR.is_dir():
        raise FileNotFoundError(f"{CONFIG_DIR}: the demo recipes live in the repository's configs/tiny")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, threads)
    jobs = default_jobs(threads) if jobs is None else jobs
    if jobs not in (1, 2):
        raise ValueError(f"jobs must be 1 or 2, got {jobs}")
    cfg = lambda n: str(CONFIG_DIR / f"{n}.yaml")  # noqa: E731
    job = lambda n, init="": (cfg(n), _overrides(n, out, threads, seed, quick, init))  # noqa: E731
    started = time.perf_counter()
    log.info("demo: training the CoT model and its teacher warm-up, and beside them the no-CoT baseline")
    (cot, teacher), (nocot,) = _run_side_by_side([[job("cot"), job("teacher")], [job("nocot")]], parallel=jobs == 2)
    log.info("demo: training the CODI and KaVa students from the warmed-up teacher")
    (codi,), (kava,) = _run_side_by_side(
        [[job("codi", teacher["checkpoint"])], [job("kava", teacher["checkpoint"])]], parallel=jobs == 2
    )
    trained = {"cot": cot, "no_cot": nocot, "codi": codi, "kava": kava, "teacher": teacher}
    methods = {key: _method(trained[key], mode, out / folder) for key, _, folder, mode in [*ROWS, TEACHER_ROW]}
    summary = {
        "methods": methods,
        "seed": seed,
        "threads_per_process": threads,
        "processes": jobs,
        "task": "synthetic-products, one and two products, strict grader",
        "wall_s": round(time.perf_counter() - started, 1),
        "quick": quick,
    }
    atomic_write_json(out / "summary.json", summary)
    table = markdown_table(methods)
    atomic_write(out / "results.md", lambda p: p.write_text(table + "\n"))
    plot(methods, out / "accuracy_vs_passes.png")
    print(table)
    print(f"\nseed {seed}; total wall time {summary['wall_s']:.0f} s; summary in {out / 'summary.json'}")
    return summary


def markdown_table(methods: dict) -> str:
    sizes = sorted({k for m in methods.values() for k in m["by_products"]}, key=int)
    head = "| method | accuracy | " + " | ".join(f"{k} product{'s' if k != '1' else ''}" for k in sizes)
    lines = [
        head + " | forward passes | KV cache / example | train steps | train wall |",
        "|---" * (len(sizes) + 6) + "|",
    ]
    for key, label, _, _ in [*ROWS, TEACHER_ROW]:
        m = methods[key]
        per_size = " | ".join(f"{100 * m['by_products'][k]:.1f}%" if k in m["by_products"] else "-" for k in sizes)
        lines.append(
            f"| {label} | {100 * m['accuracy']:.1f}% | {per_size} | {m['forward_passes']:.1f} | "
            f"{m['kv_cache_bytes'] / 1024:.1f} KiB "
            f"| {m['train_steps']} | {m['train_wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot(methods: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, label, _, _ in ROWS:
        m = methods[key]
        ax.scatter(m["forward_passes"], 100 * m["accuracy"], s=60, label=label)
    ax.set_xlabel("forward passes per question")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("kava demo: sums of products, tiny Llama")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)


__all__ = ["run_demo", "markdown_table"]

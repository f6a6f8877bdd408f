"""What an evaluation result carries besides its numbers: the standard error of an accuracy
and the provenance of the run (what was evaluated, on what, with which code), written as
``results.json`` beside the predictions."""

from __future__ import annotations

import datetime
import math
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

from ..answers import GRADERS
from ..config import KavaConfig
from ..io import atomic_write_json

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors")
RESULTS_FILE = "results.json"


def eval_folder_name(cfg: KavaConfig) -> str:
    """``<data>-<split>[-<limit>]`` for the evaluation ``cfg.data`` names (a file by its stem,
    options and other odd characters as ``_``): where ``kava eval`` writes under ``eval/``, so
    that an evaluation on other data never overwrites another."""
    d = cfg.data
    source = d.eval
    name = Path(source).stem if Path(source).suffix.lower() in (".jsonl", ".json", ".parquet") else source
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"
    return f"{name}-{d.eval_split}" + (f"-{d.eval_limit}" if d.eval_limit else "")


def accuracy_stderr(correct: int, n: int) -> float | None:
    """Standard error of a mean of ``n`` 0/1 outcomes, ``correct`` of them 1: the sample
    standard deviation over sqrt(n), i.e. sqrt(p (1 - p) / (n - 1)), as lm-evaluation-harness
    reports it; None for fewer than two outcomes."""
    if n < 2:
        return None
    p = correct / n
    return math.sqrt(p * (1 - p) / (n - 1))


def package_versions() -> dict[str, str | None]:
    """The installed version of each package kava's results depend on (None: not installed)."""
    from .. import __version__

    # kava itself: the code that runs (its distribution is called kava-latent; an unrelated
    # "kava" may be installed too), so its own version string, not a lookup by name.
    out: dict[str, str | None] = {"python": platform.python_version(), "kava": __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(where: Path | None = None) -> dict[str, object]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout the kava code runs from, or
    ``{"commit": None}`` when it does not run from one (an installed wheel) or git is absent."""
    where = where or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return {"commit": None}
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def provenance(
    cfg: KavaConfig, modes: list[str], checkpoint: str | Path | None = None, device: str | None = None
) -> dict:
    """What an evaluation ran: the checkpoint (or none, for a plain model), the base model,
    the data, split and limit, the graders, decoding settings, package versions, the git
    commit and the date (UTC)."""
    m, d, e = cfg.model, cfg.data, cfg.eval
    return {
        "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
        "model": m.name_or_path,
        "gguf_file": m.gguf_file or None,
        "init_from": m.init_from or None,
        "adapter": m.adapter,
        "train_mode": cfg.train.mode if checkpoint else None,
        "data": d.eval,
        "split": d.eval_split,
        "limit": d.eval_limit or None,
        "modes": list(modes),
        "grader": {"headline": "strict", "graders": list(GRADERS), "marker": d.answer_prefix},
        "decoding": {
            "greedy": True,
            "max_new_tokens": e.max_new_tokens,
            "max_cot_tokens": e.max_cot_tokens,
            "batch_size": e.batch_size,
            "num_latents": cfg.latent.num_latents,
            "latent_scheme": cfg.latent.scheme,
            "latent_iterations": cfg.latent.iterations,
        },
        "device": device,
        "versions": package_versions(),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(out_dir: str | Path, results: dict[str, dict], prov: dict) -> Path:
    """``results.json``: ``{"results": {mode: metrics}, "provenance": {...}}``."""
    path = Path(out_dir) / RESULTS_FILE
    atomic_write_json(path, {"results": results, "provenance": prov})
    return path

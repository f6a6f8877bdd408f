"""Training state in safetensors + JSON: optimizer, scheduler, RNG and data position.

The model itself is saved by :func:`kava.model.checkpoints.save_checkpoint`; this module adds what a
bit-exact resume needs. Nothing is pickled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..model.checkpoints import STATE_JSON, STATE_TENSORS
from ..model.files import ModelLoadError, read_tensors
from .errors import TrainingError


def optimizer_to_flat(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able metadata."""
    tensors, scalars = {}, {}
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state(generators: dict[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for name, g in generators.items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if states:
            torch.cuda.set_rng_state_all(states)
    for name, g in generators.items():
        if f"rng.gen.{name}" in tensors:
            g.set_state(tensors[f"rng.gen.{name}"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def save_trainer_state(
    folder: Path, optimizer, scheduler, generators: dict[str, torch.Generator], progress: dict
) -> None:
    """Write the two trainer-state files into ``folder`` (called inside an atomic folder build)."""
    opt_t, opt_meta = optimizer_to_flat(optimizer.state_dict())
    rng_t, rng_meta = rng_state(generators)
    save_file({**opt_t, **rng_t}, str(folder / STATE_TENSORS))
    meta = {"optimizer": opt_meta, "scheduler": scheduler.state_dict(), "rng": rng_meta, "progress": progress}
    (folder / STATE_JSON).write_text(json.dumps(meta))


def load_trainer_state(folder: Path, optimizer, scheduler, generators: dict[str, torch.Generator]) -> dict:
    """Restore optimizer, scheduler and RNG; returns the saved progress (step, data position)."""
    tensors = read_tensors(folder / STATE_TENSORS)
    try:
        meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or not all(k in meta for k in ("optimizer", "scheduler", "rng", "progress")):
            raise ValueError("expected the keys optimizer, scheduler, rng, progress")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ModelLoadError(f"{folder / STATE_JSON}: not a kava trainer state ({str(e)[:200]})") from None
    except OSError as e:
        raise ModelLoadError(f"{folder / STATE_JSON}: cannot read it ({e.strerror})") from None
    try:
        optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
    except (KeyError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"{folder / STATE_TENSORS}: the optimizer state does not fit this run's parameters ({first})"
        ) from None
    try:
        scheduler.load_state_dict(meta["scheduler"])
        set_rng_state(tensors, meta["rng"], generators)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(
            f"{folder / STATE_JSON}: the scheduler or RNG state is damaged ({type(e).__name__}: {first})"
        ) from None
    return meta["progress"]


class DataOrder:
    """Deterministic example order: a fresh seeded permutation each epoch; resumable."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0):
        if n == 0:
            raise TrainingError("no training examples")
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.offset])
            self.offset += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

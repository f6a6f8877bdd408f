"""Checkpoint folders: the files a checkpoint holds, finding a run's latest one, and the
error for a model or checkpoint that cannot be loaded.

A checkpoint ``checkpoint-N/`` holds the model (:meth:`kava.model.KavaModel.save`:
``kava_config.yaml``, ``tokenizer/``, ``model.safetensors``) and, written by the training
loop, the trainer state (``trainer_state.safetensors`` + ``trainer_state.json``).
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG_FILE = "kava_config.yaml"
WEIGHTS_FILE = "model.safetensors"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class ModelLoadError(RuntimeError):
    """A model or checkpoint that cannot be loaded; the message names it."""


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder with the highest step in ``run_dir``, if any."""
    best, best_step = None, -1
    if not Path(run_dir).is_dir():
        return None
    for child in Path(run_dir).iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / STATE_JSON).is_file() and int(m.group(1)) > best_step:
            best, best_step = child, int(m.group(1))
    return best


def read_tensors(path: Path) -> dict:
    """The tensors of the safetensors file ``path``; a missing, empty, truncated or corrupted
    file raises :class:`ModelLoadError` naming it (never a traceback from the reader)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupted ({first})") from None


def check_shapes(module, state: dict, source: Path) -> None:
    """Stop, naming ``source`` and the tensor, where a tensor of ``state`` has another shape
    than ``module``'s tensor of that name (``load_state_dict`` would raise a long traceback)."""
    own = module.state_dict()
    for name, tensor in state.items():
        mine = own.get(name)
        if mine is not None and tuple(mine.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} but the model built from the "
                                 f"config expects {tuple(mine.shape)} (weights of another architecture?)")

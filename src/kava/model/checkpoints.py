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

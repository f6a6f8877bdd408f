"""Training layer: the loop (``loop``: set up, resume, step, log, checkpoint, evaluate),
the trainer state a checkpoint keeps for an exact resume (``state``), the run folder's lock
and checks (``rundir``), the largest-batch
search (``batch_finder``) and what this machine would pick (``env``). Imports
``kava.distill``, ``kava.evaluation``, ``kava.model``, ``kava.data`` and kava's core modules."""

from .env import pick_mixed_precision
from .loop import DataOrder, Run, TrainingError, train

__all__ = ["DataOrder", "Run", "TrainingError", "pick_mixed_precision", "train"]

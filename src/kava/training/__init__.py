"""Training layer: the loop (``loop``: set up, resume, step, checkpoint, evaluate), what it logs
(``metrics``) and measures (``probes``), the optimizer (``optim``), signals (``signals``), the
trainer state and data order a checkpoint keeps for an exact resume (``state``), the run
folder's lock, checks and status (``rundir``), the trackers (``tracking``), the largest-batch
search (``batch_finder``) and what this machine would pick (``env``). Imports
``kava.distill``, ``kava.evaluation``, ``kava.model``, ``kava.data`` and kava's core modules."""

from .env import pick_mixed_precision
from .errors import TrainingError
from .loop import Run, train
from .state import DataOrder

__all__ = ["DataOrder", "Run", "TrainingError", "pick_mixed_precision", "train"]

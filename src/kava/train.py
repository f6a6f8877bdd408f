"""Moved to :mod:`kava.training` (the loop is ``kava.training.loop``); this module re-exports it."""

from .data.loaders import load_data  # noqa: F401
from .evaluation.evaluator import eval_modes  # noqa: F401
from .training.env import pick_mixed_precision  # noqa: F401
from .training.loop import DataOrder, Run, TrainingError, train  # noqa: F401

"""Moved to :mod:`kava.evaluation` (``decode``, ``evaluator``); this module re-exports it."""

from .evaluation.decode import (  # noqa: F401
    MODES,
    Generation,
    Prefilled,
    generate,
    greedy,
    hit_cap,
    kv_bytes_per_token,
    prefill,
    token_cap,
)
from .evaluation.evaluator import eval_modes, evaluate, evaluate_checkpoint, grade, summarise  # noqa: F401

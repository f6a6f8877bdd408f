"""Evaluation layer: batched greedy decoding with the KV cache in the student, CoT and no-CoT
modes (``decode``), and grading, summaries and prediction files (``evaluator``; the grader
itself is :mod:`kava.answers`). Imports only ``kava.model``, ``kava.data`` and kava's core
modules (not ``kava.distill``: a model is evaluated without its training objective)."""

from .decode import MODES, Generation, Prefilled, generate, greedy, kv_bytes_per_token, prefill
from .evaluator import eval_modes, evaluate, evaluate_checkpoint, grade, summarise

__all__ = [
    "MODES",
    "Generation",
    "Prefilled",
    "eval_modes",
    "evaluate",
    "evaluate_checkpoint",
    "generate",
    "grade",
    "greedy",
    "kv_bytes_per_token",
    "prefill",
    "summarise",
]

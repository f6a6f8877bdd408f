"""Distillation layer: the KV-cache selectors (``compression``), teacher alignment and fusion,
where a student's targets come from (``targets``), the objective, and offline cache extraction.
Imports only ``kava.model``, ``kava.data`` and kava's core modules."""

from .objective import Objective, StepOutput, StudentPass, detached, metric_floats

__all__ = ["Objective", "StepOutput", "StudentPass", "detached", "metric_floats"]

"""Moved to :mod:`kava.distill.objective`; this module re-exports it."""

from .distill.objective import Objective, StepOutput, detached, latent_count, metric_floats, to_device  # noqa: F401

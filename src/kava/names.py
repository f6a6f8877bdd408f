"""Names the configuration accepts, in a module that imports nothing.

``kava config`` help text, config validation and the ``kava`` command's parsers need these
names, not the tensor code behind them, so they live here and ``import kava.config`` stays
free of torch. The registries hold the same names: :data:`kava.distill.compression.METHODS`
(``"none"`` plus its selectors) and :mod:`kava.losses`, which imports its tuples from here.
"""

from __future__ import annotations

__all__ = ["CODI_LOSSES", "COMPRESSION_METHODS", "KV_LOSSES"]

COMPRESSION_METHODS = (
    "none",
    "rkv",
    "attention",
    "redundancy",
    "rkv_pooled",
    "right_crop",
    "last",
    "stride",
    "random",
    "mean_pool",
    "shuffled",
    "slot_mean",
    "gaussian",
    "oracle",
    "counterfactual",
)
"""``loss.compression``: no KV loss, or a teacher-cache selector of :data:`kava.distill.compression.SELECTORS`,
in the registry's order (a new selector adds its name here too; a test checks the two agree)."""

KV_LOSSES = ("l1", "mse", "smooth_l1", "cosine")
"""``loss.kv_loss``: distances between teacher and student cache entries."""

CODI_LOSSES = ("l1", "smooth_l1", "mse")
"""``loss.codi_loss``: distances between teacher and student hidden states."""

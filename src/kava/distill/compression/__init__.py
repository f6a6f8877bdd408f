"""Compression of the teacher's chain-of-thought KV-cache to M entries per layer and head.

Selectors are found by name in :data:`SELECTORS`. :func:`select` is the public contract for
index-based selectors on one layer; :func:`compress_cache` compresses every layer at once
(layers are folded into the batch dimension, no Python loop over layers or heads).
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

# The selector modules, imported in the order their names are listed (R-KV first); any other
# module of this package is imported after them, so a new selector is one new file.
# isort: off
from . import rkv, rkv_pooled, positional, pooled, shuffled, content  # noqa: F401

# isort: on
from .base import SELECTORS, Compressed, ScoreSelector, Selector, SelectRequest, gather_slots, register, top_budget
from .content import CounterfactualSelector, OracleSelector
from .pooled import MeanPoolSelector
from .positional import FirstSelector, LastSelector, RandomSelector, StrideSelector
from .rkv import RKVSelector, attention_importance, redundancy_scores, rkv_scores
from .rkv_pooled import RKVPooledSelector, pooled_attention_importance, retained_redundancy, rkv_pooled_scores
from .shuffled import GaussianSelector, ShuffledSelector, SlotMeanSelector, batch_moments, partners

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

METHODS = ("none", *SELECTORS)
"""``loss.compression``: ``none`` (no KV loss, handled by the objective) or a selector of
:data:`SELECTORS`. ``rkv`` is R-KV as the KaVa paper describes it (softmax over the CoT of the
answer attention averaged over a GQA group, plus ``softmax(-mean cosine)``), the selection kava's
experiments use; ``rkv_pooled`` is R-KV as its authors' reference code computes it (max over the
group's logits, attention max-pooled over 7 neighbouring keys, the latest of near-copies kept, the
softmax of mean similarity subtracted): the R-KV paper's own method. ``shuffled``, ``slot_mean``
and ``gaussian`` make an example's targets from the rest of its batch; ``counterfactual`` selects
on a counterfactual teacher pass; ``oracle`` keeps the result tokens."""


def get_selector(method: str, lam: float = 0.1) -> Selector:
    """The selector called ``method`` (see :data:`SELECTORS`)."""
    try:
        return SELECTORS[method](lam)
    except KeyError:
        raise ValueError(f"unknown compression method {method!r}; choose from {', '.join(SELECTORS)}") from None


def _exchange(t: torch.Tensor, batch_dim: int, partner: torch.Tensor) -> torch.Tensor:
    """``t`` with example ``i`` holding example ``partner[i]``'s entries along ``batch_dim``."""
    return t.index_select(batch_dim, partner.to(t.device))


def select(
    method: str,
    keys: torch.Tensor,
    queries: torch.Tensor | None,
    cot_mask: torch.Tensor,
    answer_mask: torch.Tensor | None,
    budget: int,
    lam: float = 0.1,
    generator: torch.Generator | None = None,
    source_ids: list[str] | None = None,
    token_types: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``budget`` teacher entries to keep, per example and KV head.

    keys ``[B, H_kv, N, d]`` (the whole teacher sequence of one layer), queries
    ``[B, H_q, A, d]`` at the answer positions, cot_mask ``[B, N]``, answer_mask ``[B, A]``.
    Returns ``(indices [B, H_kv, budget] long, valid [B, H_kv, budget] bool)``; kept indices
    are in increasing (time) order, then the invalid slots when the CoT is shorter than
    ``budget``. Only index-based selectors have indices; ``mean_pool`` builds new entries,
    use :func:`compress_cache` for it. ``source_ids`` (one per example) let the shuffled
    control avoid pairing an example with a copy of itself (see :func:`partners`); slots of an
    example left without a partner are invalid. ``token_types [B, N]``: for ``oracle``.
    """
    selector = get_selector(method, lam)
    if not isinstance(selector, ScoreSelector) or selector.builds_entries:
        raise ValueError(f"method {method!r} builds new entries and has no indices; use compress_cache")
    types = token_types if selector.needs_token_types else None
    indices, valid = selector.select(
        SelectRequest(keys, None, queries, cot_mask, answer_mask, budget, generator, types)
    )
    if selector.whole_batch:
        partner, ok = partners(source_ids, indices.shape[0], indices.device)
        indices, valid = _exchange(indices, 0, partner), _exchange(valid, 0, partner) & ok[:, None, None]
    return indices, valid


def _cot_columns(cot_mask: torch.Tensor) -> tuple[int, int]:
    """``[lo, hi)``: the smallest column range holding every CoT position of the batch."""
    cols = cot_mask.any(0).nonzero()
    if cols.numel() == 0:
        return 0, cot_mask.shape[1]
    return int(cols[0]), int(cols[-1]) + 1


def compress_cache(
    selector: Selector,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    cot_mask: torch.Tensor,
    answer_mask: torch.Tensor | None,
    budget: int,
    generator: torch.Generator | None = None,
    source_ids: list[str] | None = None,
    token_types: torch.Tensor | None = None,
) -> Compressed:
    """Compress every layer at once.

    keys / values ``[L, B, H_kv, N, d]``, queries ``[L, B, H_q, A, d]`` (or None when the
    selector does not need them), cot_mask ``[B, N]``, answer_mask ``[B, A]``. Returns
    :class:`Compressed` with ``[L, B, H_kv, M, ...]`` tensors. ``source_ids``, ``token_types``: as
    for :func:`select`.
    """
    n_layers, b = keys.shape[:2]
    # Only the columns that hold a CoT token somewhere in the batch can be kept: score those
    # alone (the answer-query x CoT-key block, and CoT x CoT for redundancy), not the whole sequence.
    lo, hi = _cot_columns(cot_mask)
    keys, values, cot_mask = keys[..., lo:hi, :], values[..., lo:hi, :], cot_mask[:, lo:hi]
    fold = lambda t: t.reshape(n_layers * b, *t.shape[2:])  # noqa: E731
    rep = lambda m: None if m is None else m.repeat(n_layers, 1)  # noqa: E731
    q = fold(queries) if queries is not None and selector.needs_queries else None
    types = None
    if selector.needs_token_types:
        if token_types is None:
            raise ValueError(f"the {selector.name} selector needs the teacher batch's token types")
        types = rep(token_types[:, lo:hi])
    c = selector.compress(
        SelectRequest(fold(keys), fold(values), q, rep(cot_mask), rep(answer_mask), budget, generator, types)
    )
    unfold = lambda t: None if t is None else t.reshape(n_layers, b, *t.shape[1:])  # noqa: E731
    indices = unfold(c.indices)
    if indices is not None and lo:
        indices = torch.where(unfold(c.valid), indices + lo, torch.zeros_like(indices))
    out = Compressed(unfold(c.keys), unfold(c.values), unfold(c.valid), indices)
    return selector.across_batch(out, source_ids, generator)


__all__ = [
    "FirstSelector",
    "LastSelector",
    "MeanPoolSelector",
    "RandomSelector",
    "RKVSelector",
    "ShuffledSelector",
    "StrideSelector",
    "Compressed",
    "SelectRequest",
    "register",
    "CounterfactualSelector",
    "GaussianSelector",
    "METHODS",
    "OracleSelector",
    "SlotMeanSelector",
    "batch_moments",
    "SELECTORS",
    "Selector",
    "ScoreSelector",
    "attention_importance",
    "compress_cache",
    "gather_slots",
    "partners",
    "get_selector",
    "redundancy_scores",
    "rkv_scores",
    "RKVPooledSelector",
    "pooled_attention_importance",
    "retained_redundancy",
    "rkv_pooled_scores",
    "select",
    "top_budget",
]

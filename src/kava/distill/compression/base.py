"""The core abstraction of teacher-cache compression.

A *selector* turns the chain-of-thought part of a teacher's KV-cache into ``budget``
entries per KV head. Most selectors score every cached position and keep the top
``budget`` of them (:class:`ScoreSelector`); a few build new entries instead (mean
pooling) or take another example's entries (the shuffled negative control).

Shapes (one layer, or several layers folded into the batch dimension):

* ``keys`` / ``values``: ``[B, H_kv, N, d]`` the cache of the whole teacher sequence
* ``queries``: ``[B, H_q, A, d]`` the teacher's queries at the answer positions
* ``cot_mask``: ``[B, N]`` bool, True at chain-of-thought positions
* ``answer_mask``: ``[B, A]`` bool, True at real (non-padding) answer queries
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass
class Compressed:
    """``budget`` teacher entries per KV head, in time order, and which slots are real."""

    keys: torch.Tensor  # [B, H_kv, M, d]
    values: torch.Tensor  # [B, H_kv, M, d]
    valid: torch.Tensor  # [B, H_kv, M] bool
    indices: torch.Tensor | None = None  # [B, H_kv, M] long, None for pooled entries


class Selector:
    """Base class: compress a teacher cache to ``budget`` entries per KV head.

    Flags a selector may set: ``needs_token_types`` (its ``compress`` takes the teacher batch's
    ``token_types [B, N]``, see :data:`kava.data.sequences.TOKEN_TYPES`), ``builds_entries``
    (its targets are not entries of the example's own cache, so it has no indices to give), and
    :meth:`across_batch` for targets made from the other examples of the batch.
    """

    name: str = ""
    needs_queries: bool = False
    needs_token_types: bool = False
    builds_entries: bool = False

    def across_batch(self, c: Compressed, source_ids: list[str] | None, generator: torch.Generator | None) -> Compressed:
        """The batch's targets ``[L, B, H_kv, M, d]`` after every example was compressed on its
        own: the identity, except for the controls that mix examples."""
        return c

    def compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor | None,
        cot_mask: torch.Tensor,
        answer_mask: torch.Tensor | None,
        budget: int,
        generator: torch.Generator | None = None,
    ) -> Compressed:
        raise NotImplementedError


class ScoreSelector(Selector):
    """Selectors that score each CoT position and keep the ``budget`` best, in time order."""

    def score(
        self,
        keys: torch.Tensor,
        queries: torch.Tensor | None,
        cot_mask: torch.Tensor,
        answer_mask: torch.Tensor | None,
        budget: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return float scores ``[B, H_kv, N]``; positions outside the CoT are ignored."""
        raise NotImplementedError

    def select(
        self,
        keys: torch.Tensor,
        queries: torch.Tensor | None,
        cot_mask: torch.Tensor,
        answer_mask: torch.Tensor | None,
        budget: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(keys, queries, cot_mask, answer_mask, budget, generator).float()
        return top_budget(scores, cot_mask, budget)

    def compress(self, keys, values, queries, cot_mask, answer_mask, budget, generator=None):
        indices, valid = self.select(keys, queries, cot_mask, answer_mask, budget, generator)
        return Compressed(gather_slots(keys, indices), gather_slots(values, indices), valid, indices)


def top_budget(scores: torch.Tensor, cot_mask: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``budget`` highest-scoring CoT positions per (example, head), in time order.

    scores: ``[B, H, N]``; cot_mask: ``[B, N]``. Returns ``(indices [B, H, budget] long,
    valid [B, H, budget] bool)``. Positions outside ``cot_mask`` are never kept; when an
    example has fewer than ``budget`` CoT positions the extra slots are ``valid=False``
    (their index is 0, a safe gather target) and sit after the real ones.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    b, h, n = scores.shape
    allowed = cot_mask[:, None, :].expand(b, h, n)
    masked = scores.masked_fill(~allowed, NEG_INF)
    k = min(budget, n)
    top_scores, top_idx = masked.topk(k, dim=-1)
    valid = torch.isfinite(top_scores) & (top_scores > NEG_INF)
    # Time order: invalid slots sort after every real position.
    order_key = torch.where(valid, top_idx, torch.full_like(top_idx, n))
    order_key, perm = order_key.sort(dim=-1)
    valid = valid.gather(-1, perm)
    indices = torch.where(valid, order_key, torch.zeros_like(order_key))
    if k < budget:
        pad = budget - k
        indices = torch.cat([indices, indices.new_zeros(b, h, pad)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(b, h, pad)], dim=-1)
    return indices, valid


def gather_slots(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gather ``x [B, H, N, d]`` at ``indices [B, H, M]`` -> ``[B, H, M, d]``."""
    return x.gather(2, indices[..., None].expand(*indices.shape, x.shape[-1]))


def cot_rank(cot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank of each position among its example's CoT positions, and the CoT length.

    Returns ``(rank [B, N] long, -1 outside the CoT; n_cot [B] long)``.
    """
    m = cot_mask.long()
    rank = m.cumsum(-1) - 1
    return rank.masked_fill(~cot_mask, -1), m.sum(-1)

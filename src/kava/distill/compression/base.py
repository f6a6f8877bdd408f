"""The core abstraction of teacher-cache compression.

A *selector* turns the chain-of-thought part of a teacher's KV-cache into ``budget``
entries per KV head, asked by a :class:`SelectRequest`. Most selectors score every cached position and keep the top
``budget`` of them (:class:`ScoreSelector`); a few build new entries instead (mean
pooling) or take another example's entries (the shuffled negative control). Each selector is
one class in one module of this package, registered by name with :func:`register`, and declares
its capabilities (:class:`Selector`).

Shapes (one layer, or several layers folded into the batch dimension):

* ``keys`` / ``values``: ``[B, H_kv, N, d]`` the cache of the whole teacher sequence
* ``queries``: ``[B, H_q, A, d]`` the teacher's queries at the answer positions
* ``cot_mask``: ``[B, N]`` bool, True at chain-of-thought positions
* ``answer_mask``: ``[B, A]`` bool, True at real (non-padding) answer queries
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

NEG_INF = float("-inf")


@dataclass
class Compressed:
    """``budget`` teacher entries per KV head, in time order, and which slots are real."""

    keys: torch.Tensor  # [B, H_kv, M, d]
    values: torch.Tensor  # [B, H_kv, M, d]
    valid: torch.Tensor  # [B, H_kv, M] bool
    indices: torch.Tensor | None = None  # [B, H_kv, M] long, None for pooled entries


@dataclass
class SelectRequest:
    """What a selector is asked to compress (shapes in the module docstring): one layer's cache,
    or several layers folded into the batch dimension, and where its CoT and answer are."""

    keys: torch.Tensor  # [B, H_kv, N, d]
    values: torch.Tensor | None  # [B, H_kv, N, d]; None when only indices are asked for
    queries: torch.Tensor | None  # [B, H_q, A, d], None unless the selector needs_queries
    cot_mask: torch.Tensor  # [B, N] bool
    answer_mask: torch.Tensor | None  # [B, A] bool
    budget: int
    generator: torch.Generator | None = None
    token_types: torch.Tensor | None = None  # [B, N], given to selectors that need_token_types


class Selector:
    """Base class: compress a teacher cache to ``budget`` entries per KV head.

    A selector declares what it can do and needs; every check of a config, a teacher cache, an
    extraction or an instrument derives from these, never from a list of names:

    * ``needs_queries``: it reads the teacher's queries at the answer positions;
    * ``needs_token_types``: it reads the teacher batch's ``token_types [B, N]``
      (:data:`kava.data.sequences.TOKEN_TYPES`), so it serves the student's own teacher only;
    * ``builds_entries``: its targets are not entries of the example's own cache, so it has no
      indices to give;
    * ``whole_batch``: its targets are made from the other examples of the batch
      (:meth:`across_batch`), so it needs two examples a batch and cannot be cached;
    * ``second_pass``: its targets come from a second teacher pass (run by its target source,
      :mod:`kava.distill.targets`), so it serves the student's own teacher only and cannot be cached.
    """

    name: str = ""
    needs_queries: bool = False
    needs_token_types: bool = False
    builds_entries: bool = False
    whole_batch: bool = False
    second_pass: bool = False

    @property
    def cacheable(self) -> bool:
        """Whether its targets can be extracted once and read back (``kava teacher extract``,
        ``loss.teacher_cache``): per example, from the plain teacher pass alone."""
        return not (self.whole_batch or self.second_pass or self.needs_token_types)

    @property
    def own_teacher_only(self) -> bool:
        """Whether it needs the student's own teacher (not ``teachers.models``)."""
        return self.second_pass or self.needs_token_types

    @property
    def index_based(self) -> bool:
        """Whether it keeps entries of each example's own cache, with indices to compare."""
        return not (self.builds_entries or self.whole_batch or self.second_pass)

    def across_batch(
        self, c: Compressed, source_ids: list[str] | None, generator: torch.Generator | None
    ) -> Compressed:
        """The batch's targets ``[L, B, H_kv, M, d]`` after every example was compressed on its
        own: the identity, except for the selectors that are ``whole_batch``."""
        return c

    def compress(self, r: SelectRequest) -> Compressed:
        raise NotImplementedError


class ScoreSelector(Selector):
    """Selectors that score each CoT position and keep the ``budget`` best, in time order."""

    def score(self, r: SelectRequest) -> torch.Tensor:
        """Return float scores ``[B, H_kv, N]``; positions outside the CoT are ignored."""
        raise NotImplementedError

    def select(self, r: SelectRequest) -> tuple[torch.Tensor, torch.Tensor]:
        return top_budget(self.score(r).float(), r.cot_mask, r.budget)

    def compress(self, r: SelectRequest) -> Compressed:
        indices, valid = self.select(r)
        return Compressed(gather_slots(r.keys, indices), gather_slots(r.values, indices), valid, indices)


SELECTORS: dict[str, Callable[[float], Selector]] = {}
"""Every selector by name, as a factory ``lam -> Selector`` (``lam``: ``loss.lam``); filled by
:func:`register` as the selector modules are imported."""


def register(name: str, factory: Callable[[float], Selector] | None = None):
    """Add a selector under ``name``: ``register(name, factory)``, or as a class decorator
    (``@register("rkv")``), which builds ``cls(lam=lam)`` when the class has a ``lam`` field and
    ``cls()`` otherwise."""

    def add(made):
        if name in SELECTORS:
            raise ValueError(f"a selector named {name!r} is already registered")
        if isinstance(made, type):
            takes_lam = "lam" in {f.name for f in fields(made)}
            SELECTORS[name] = (lambda lam: made(lam=lam)) if takes_lam else (lambda lam: made())
        else:
            SELECTORS[name] = made
        return made

    return add if factory is None else add(factory)


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

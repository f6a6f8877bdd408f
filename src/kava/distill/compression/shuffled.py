"""Controls made from the other examples of a batch, after the same R-KV selection.

* ``shuffled``: each example takes another example's targets (never its own, see :func:`partners`);
* ``slot_mean``: each example takes the batch mean per layer, KV head, slot and dimension: the
  structure every example shares (layout, positions, token types) without its own content;
* ``gaussian``: noise drawn per example with the batch's per-entry mean and standard deviation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import Compressed, register
from .rkv import RKVSelector


@register("shuffled")
@dataclass
class ShuffledSelector(RKVSelector):
    """R-KV selection whose targets are then taken from another example of the batch.

    The exchange is :meth:`across_batch` (for :func:`kava.distill.compression.compress_cache`) and,
    on indices, :func:`kava.distill.compression.select`, with the pairing of :func:`partners`.
    """

    name: str = "shuffled"
    whole_batch = True

    def across_batch(self, c, source_ids, generator):
        partner, ok = partners(source_ids, c.valid.shape[1], c.valid.device)
        moved = [None if t is None else t.index_select(1, partner) for t in (c.keys, c.values, c.valid, c.indices)]
        moved[2] = moved[2] & ok[None, :, None, None]
        return Compressed(*moved)


def batch_moments(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation over the batch of ``x [L, B, H, M, d]`` at the
    ``valid [L, B, H, M]`` slots, each ``[L, 1, H, M, d]``, and the number of valid examples
    ``[L, 1, H, M]``."""
    w = valid[..., None].to(x.dtype)
    count = valid.sum(1, keepdim=True)
    n = count[..., None].clamp_min(1).to(x.dtype)
    mean = (x * w).sum(1, keepdim=True) / n
    var = (((x - mean) ** 2) * w).sum(1, keepdim=True) / n
    return mean, var.sqrt(), count


def _need_two(c: Compressed, name: str) -> None:
    if c.valid.shape[1] < 2:
        raise ValueError(f"the {name} selector needs at least 2 examples per batch")


def _shared(valid: torch.Tensor) -> torch.Tensor:
    """``valid [L, B, H, M]`` where at least two examples fill the slot: a slot only one example
    fills would hand it its own entry (or noise of zero spread around it)."""
    return valid & (valid.sum(1, keepdim=True) >= 2)


@register("slot_mean")
@dataclass
class SlotMeanSelector(RKVSelector):
    """R-KV selection, then every example's targets replaced by the batch mean per layer, KV
    head, slot and dimension (over the examples whose slot is real). Each example still counts
    for 1/B of the mean; a slot is real where the example's own slot was and at least one other
    example's too."""

    name: str = "slot_mean"
    builds_entries = True
    whole_batch = True

    def across_batch(self, c, source_ids, generator):
        _need_two(c, self.name)
        mk, _, _ = batch_moments(c.keys, c.valid)
        mv, _, _ = batch_moments(c.values, c.valid)
        return Compressed(
            mk.expand_as(c.keys).contiguous(), mv.expand_as(c.values).contiguous(), _shared(c.valid), None
        )


@register("gaussian")
@dataclass
class GaussianSelector(RKVSelector):
    """R-KV selection, then every example's targets replaced by Gaussian noise with the batch's
    mean and (population) standard deviation of each entry, drawn with the selector's generator;
    slots as for :class:`SlotMeanSelector`."""

    name: str = "gaussian"
    builds_entries = True
    whole_batch = True

    def across_batch(self, c, source_ids, generator):
        _need_two(c, self.name)
        out = []
        for x in (c.keys, c.values):
            mean, std, _ = batch_moments(x.float(), c.valid)
            noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
            out.append((mean + std * noise).to(x.dtype))
        return Compressed(out[0], out[1], _shared(c.valid), None)


def partners(
    source_ids: Sequence[str] | None, batch: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whose targets each example of a batch receives, never its own.

    ``source_ids``: one id per example (None: every example is distinct). With distinct ids,
    example ``i`` takes example ``i - 1``'s targets (a roll by one). When an example appears
    more than once (an epoch boundary can put one in a batch twice), the batch is ordered by
    id and shifted by the largest multiplicity ``k``, so no copy lands on itself whenever
    ``k <= batch / 2``; examples left without another example's targets (say a batch of two
    copies) are flagged. Returns ``(partner [B] long, has_partner [B] bool)``.
    """
    if batch < 2:
        raise ValueError("the shuffled selector needs at least 2 examples per batch")
    ids = list(range(batch)) if source_ids is None else list(source_ids)
    if len(ids) != batch:
        raise ValueError(f"{len(ids)} source ids for a batch of {batch}")
    if len(set(ids)) == batch:
        partner = [(i - 1) % batch for i in range(batch)]
    else:
        order = sorted(range(batch), key=lambda i: (ids[i], i))
        k = max(Counter(ids).values())
        partner = [0] * batch
        for rank, i in enumerate(order):
            partner[i] = order[(rank - k) % batch]
    ok = [ids[partner[i]] != ids[i] for i in range(batch)]
    return (torch.tensor(partner, dtype=torch.long, device=device), torch.tensor(ok, dtype=torch.bool, device=device))

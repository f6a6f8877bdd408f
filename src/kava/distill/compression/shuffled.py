"""The negative control: each student is matched to another example's compressed cache."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rkv import RKVSelector


@dataclass
class ShuffledSelector(RKVSelector):
    """R-KV selection whose targets are then taken from another example of the batch.

    The exchange itself is done by :func:`kava.distill.compression.compress_cache` (and
    :func:`kava.distill.compression.select`), which know where the batch dimension is, with the
    pairing of :func:`partners`.
    """

    name: str = "shuffled"
    shuffle_batch = True


def partners(source_ids: Sequence[str] | None, batch: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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

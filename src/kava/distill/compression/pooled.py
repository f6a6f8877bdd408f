"""Selectors that build their entries rather than pick them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Compressed, Selector, SelectRequest, cot_rank, register


def chunk_ids(cot_mask: torch.Tensor, budget: int) -> torch.Tensor:
    """Assign each CoT position to one of ``budget`` contiguous chunks; -1 outside the CoT.

    With N_C >= budget the chunks are as equal as possible; with N_C < budget each CoT
    token is its own chunk and the remaining chunks stay empty.
    """
    rank, n_cot = cot_rank(cot_mask)
    n = n_cot.clamp_min(1)[:, None]
    ids = torch.where(n >= budget, (rank * budget) // n, rank)
    return ids.masked_fill(~cot_mask, -1)


@register("mean_pool")
@dataclass
class MeanPoolSelector(Selector):
    """The "full" baseline: mean-pool the whole CoT cache into ``budget`` contiguous chunks."""

    name: str = "mean_pool"
    builds_entries = True

    def compress(self, r: SelectRequest) -> Compressed:
        keys, values, cot_mask, budget = r.keys, r.values, r.cot_mask, r.budget
        b, h, n, d = keys.shape
        ids = chunk_ids(cot_mask, budget)  # [B, N]
        onehot = torch.nn.functional.one_hot(ids.clamp_min(0), budget).to(keys.dtype)
        onehot = onehot * cot_mask[..., None].to(keys.dtype)  # [B, N, M]
        count = onehot.sum(1)  # [B, M]
        weights = onehot / count.clamp_min(1)[:, None, :]
        pooled_k = torch.einsum("bhnd,bnm->bhmd", keys, weights)
        pooled_v = torch.einsum("bhnd,bnm->bhmd", values, weights)
        valid = (count > 0)[:, None, :].expand(b, h, budget)
        return Compressed(pooled_k, pooled_v, valid, None)

"""Selectors that look only at where a CoT token sits, not at what it holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreSelector, cot_rank


@dataclass
class FirstSelector(ScoreSelector):
    """Right-crop: keep the first ``budget`` CoT tokens."""

    name: str = "right_crop"

    def score(self, keys, queries, cot_mask, answer_mask, budget, generator=None):
        rank, _ = cot_rank(cot_mask)
        return (-rank.float())[:, None, :].expand(keys.shape[0], keys.shape[1], -1)


@dataclass
class LastSelector(ScoreSelector):
    """Keep the last ``budget`` CoT tokens."""

    name: str = "last"

    def score(self, keys, queries, cot_mask, answer_mask, budget, generator=None):
        rank, _ = cot_rank(cot_mask)
        return rank.float()[:, None, :].expand(keys.shape[0], keys.shape[1], -1)


@dataclass
class StrideSelector(ScoreSelector):
    """Keep ``budget`` CoT tokens at a uniform stride: ranks ``floor(j * N_C / budget)``."""

    name: str = "stride"

    def score(self, keys, queries, cot_mask, answer_mask, budget, generator=None):
        rank, n_cot = cot_rank(cot_mask)
        m = budget
        targets = (torch.arange(m, device=keys.device)[None, :] * n_cot[:, None]) // m  # [B, M]
        hit = (rank[:, :, None] == targets[:, None, :]).any(-1) | (n_cot[:, None] <= m)
        return hit.float()[:, None, :].expand(keys.shape[0], keys.shape[1], -1)


@dataclass
class RandomSelector(ScoreSelector):
    """Keep ``budget`` CoT tokens drawn uniformly at random (per example and head)."""

    name: str = "random"

    def score(self, keys, queries, cot_mask, answer_mask, budget, generator=None):
        return torch.rand(keys.shape[:3], generator=generator, device="cpu").to(keys.device)

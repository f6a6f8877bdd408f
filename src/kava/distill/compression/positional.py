"""Selectors that look only at where a CoT token sits, not at what it holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreSelector, SelectRequest, cot_rank, register


@register("right_crop")
@dataclass
class FirstSelector(ScoreSelector):
    """Right-crop: keep the first ``budget`` CoT tokens."""

    name: str = "right_crop"

    def score(self, r: SelectRequest) -> torch.Tensor:
        rank, _ = cot_rank(r.cot_mask)
        return (-rank.float())[:, None, :].expand(r.keys.shape[0], r.keys.shape[1], -1)


@register("last")
@dataclass
class LastSelector(ScoreSelector):
    """Keep the last ``budget`` CoT tokens."""

    name: str = "last"

    def score(self, r: SelectRequest) -> torch.Tensor:
        rank, _ = cot_rank(r.cot_mask)
        return rank.float()[:, None, :].expand(r.keys.shape[0], r.keys.shape[1], -1)


@register("stride")
@dataclass
class StrideSelector(ScoreSelector):
    """Keep ``budget`` CoT tokens at a uniform stride: ranks ``floor(j * N_C / budget)``."""

    name: str = "stride"

    def score(self, r: SelectRequest) -> torch.Tensor:
        rank, n_cot = cot_rank(r.cot_mask)
        m = r.budget
        targets = (torch.arange(m, device=r.keys.device)[None, :] * n_cot[:, None]) // m  # [B, M]
        hit = (rank[:, :, None] == targets[:, None, :]).any(-1) | (n_cot[:, None] <= m)
        return hit.float()[:, None, :].expand(r.keys.shape[0], r.keys.shape[1], -1)


@register("random")
@dataclass
class RandomSelector(ScoreSelector):
    """Keep ``budget`` CoT tokens drawn uniformly at random (per example and head)."""

    name: str = "random"

    def score(self, r: SelectRequest) -> torch.Tensor:
        return torch.rand(r.keys.shape[:3], generator=r.generator, device="cpu").to(r.keys.device)

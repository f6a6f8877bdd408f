"""R-KV's selection as its authors' code computes it (``rkv_pooled``), beside kava's ``rkv``.

The R-KV paper (arXiv 2505.24133) describes the score as ``lambda * importance - (1 - lambda) *
redundancy``; its reference implementation makes three choices the paper's text does not spell
out, and kava's ``rkv`` (:mod:`.rkv`, the KaVa paper's reading of R-KV) makes none of them:

1. GQA: the raw attention logits of the query heads of one KV group are pooled by their
   **maximum** before the softmax (``rkv`` averages the probabilities of the group).
2. Importance is the mean over the observation queries of the softmax, then **max-pooled over
   neighbouring key positions** (a window of ``kernel`` = 7, stride 1, centred), so a key next to
   an attended key counts as attended (``rkv``: no pooling, renormalised over the CoT).
3. Redundancy: the cosine-similarity matrix of the keys (diagonal 0); for each key ``i`` the
   **last** other key with cosine above ``threshold`` = 0.5 has its entry ``(i, j)`` set to 0, so
   of a run of near-copies the latest is kept; then the mean over rows ``i`` per key ``j``, and a
   softmax over ``j``, subtracted from the score (``rkv``: ``softmax(-mean similarity)``, added).

Adapted to KaVa's setting as ``rkv`` is: the observation queries are the answer tokens' (R-KV's
last ``window_size`` decoded tokens), and only valid CoT keys take part in every softmax, mean and
in the similarity matrix (R-KV scores the whole cache). Where a key has no similar key the
reference code zeroes column 0 of its row (the sequence's first token, which in R-KV is the
prompt's and here would be an arbitrary CoT column): nothing is zeroed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import NEG_INF, ScoreSelector, SelectRequest, register

KERNEL = 7
THRESHOLD = 0.5


def pooled_attention_importance(
    keys: torch.Tensor, queries: torch.Tensor, cot_mask: torch.Tensor, answer_mask: torch.Tensor, kernel: int = KERNEL
) -> torch.Tensor:
    """Answer-query attention to each CoT key, R-KV's way: ``[B, H_kv, N]``, 0 outside the CoT.

    keys ``[B, H_kv, N, d]``, queries ``[B, H_q, A, d]`` (query heads of one KV group contiguous),
    cot_mask ``[B, N]``, answer_mask ``[B, A]``. Logits are max-pooled over the group's query
    heads, soft-maxed over the valid CoT keys, averaged over the valid answer queries, then
    max-pooled over ``kernel`` neighbouring key positions (odd ``kernel``; 1: no pooling).
    """
    b, h_kv, n, d = keys.shape
    h_q, a = queries.shape[1], queries.shape[2]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be odd and >= 1, got {kernel}")
    q = queries.float().reshape(b, h_kv, h_q // h_kv, a, d)
    logits = torch.einsum("bhgad,bhnd->bhgan", q, keys.float()).amax(2) / math.sqrt(d)  # [B, H, A, N]
    logits = logits.masked_fill(~cot_mask[:, None, None, :], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0) * cot_mask[:, None, None, :]
    qmask = answer_mask[:, None, :, None].float()
    mean = (probs * qmask).sum(2) / qmask.sum(2).clamp_min(1.0)  # [B, H, N]
    pooled = F.max_pool1d(mean.reshape(b * h_kv, 1, n), kernel_size=kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(b, h_kv, n) * cot_mask[:, None, :]


def retained_redundancy(keys: torch.Tensor, cot_mask: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """R-KV's redundancy: ``[B, H, N]`` from keys ``[B, H, N, d]``, cot_mask ``[B, N]``; 0 outside the CoT.

    ``S = cos(k_i, k_j)`` over valid CoT pairs, 0 on the diagonal; in each row ``i`` the entry of
    the last ``j`` with ``S_ij > threshold`` is set to 0; then ``mean_i S_ij`` over the valid rows,
    soft-maxed over the valid ``j``. A high value: ``j`` is much like the others.
    """
    n = keys.shape[2]
    u = F.normalize(keys.float(), dim=-1)
    pair = cot_mask[:, None, :, None] & cot_mask[:, None, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=keys.device)
    sim = (u @ u.transpose(-1, -2)).masked_fill(~pair | eye, 0.0)  # [B, H, N, N]
    col = torch.arange(n, device=keys.device)
    similar = (sim > threshold) & pair & ~eye
    last = torch.where(similar, col, -1).amax(-1)  # [B, H, N]: the last similar column of each row, -1: none
    sim = sim.masked_fill((col == last[..., None]) & (last[..., None] >= 0), 0.0)
    n_cot = cot_mask.sum(-1).clamp_min(1).float()[:, None, None]
    mean = sim.sum(-2) / n_cot  # mean over the valid rows i, per column j
    logits = mean.masked_fill(~cot_mask[:, None, :], NEG_INF)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0) * cot_mask[:, None, :]


def rkv_pooled_scores(
    keys: torch.Tensor,
    queries: torch.Tensor | None,
    cot_mask: torch.Tensor,
    answer_mask: torch.Tensor | None,
    lam: float,
    kernel: int = KERNEL,
    threshold: float = THRESHOLD,
) -> torch.Tensor:
    """``S = lam * pooled importance - (1 - lam) * redundancy``, ``[B, H_kv, N]`` (higher: keep)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    score = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    if lam > 0:
        if queries is None or answer_mask is None:
            raise ValueError("attention importance needs the answer queries and answer_mask")
        score = score + lam * pooled_attention_importance(keys, queries, cot_mask, answer_mask, kernel)
    if lam < 1:
        score = score - (1 - lam) * retained_redundancy(keys, cot_mask, threshold)
    return score


@register("rkv_pooled")
@dataclass
class RKVPooledSelector(ScoreSelector):
    """R-KV's selection as its authors' reference code computes it (see this module); ``rkv`` is
    the KaVa paper's description of R-KV, kept unchanged under its name. ``lam`` weighs the pooled
    attention against redundancy, as for ``rkv`` (``loss.lam``)."""

    lam: float = 0.1
    kernel: int = KERNEL
    threshold: float = THRESHOLD
    name: str = "rkv_pooled"

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.lam > 0

    def score(self, r: SelectRequest) -> torch.Tensor:
        return rkv_pooled_scores(r.keys, r.queries, r.cot_mask, r.answer_mask, self.lam, self.kernel, self.threshold)

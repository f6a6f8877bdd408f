"""R-KV style scoring: answer-attention importance mixed with key redundancy."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import NEG_INF, ScoreSelector, SelectRequest, register


def attention_importance(
    keys: torch.Tensor, queries: torch.Tensor, cot_mask: torch.Tensor, answer_mask: torch.Tensor
) -> torch.Tensor:
    """Mean attention probability from the answer queries to each CoT key.

    keys ``[B, H_kv, N, d]``, queries ``[B, H_q, A, d]`` with ``H_q = G * H_kv`` (GQA: query
    head ``g * ... `` belongs to KV head ``q_head // G``), cot_mask ``[B, N]``, answer_mask
    ``[B, A]``. The softmax runs over the valid CoT keys only, so each query's row sums to one
    over the CoT; the result ``[B, H_kv, N]`` is averaged over valid answer queries and the
    query heads of each group, and is 0 outside the CoT.
    """
    b, h_kv, n, d = keys.shape
    h_q, a = queries.shape[1], queries.shape[2]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of KV heads ({h_kv})")
    g = h_q // h_kv
    q = queries.float().reshape(b, h_kv, g * a, d)  # query heads of one group are contiguous
    logits = torch.einsum("bhqd,bhnd->bhqn", q, keys.float()) / math.sqrt(d)
    logits = logits.masked_fill(~cot_mask[:, None, None, :], NEG_INF)
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows with no CoT give 0
    qmask = answer_mask[:, None, None, :].expand(b, 1, g, a).reshape(b, 1, g * a).float()
    total = (probs * qmask[..., None]).sum(2)
    count = qmask.sum(-1).clamp_min(1.0)
    importance = total / count[..., None]
    # Renormalise over the CoT so that importance sums to one wherever a CoT exists.
    return importance / importance.sum(-1, keepdim=True).clamp_min(1e-12)


def redundancy_scores(keys: torch.Tensor, cot_mask: torch.Tensor) -> torch.Tensor:
    """R_i = softmax over valid CoT keys of ``-(1/N_C) * sum_{j != i} cos(k_i, k_j)``.

    keys ``[B, H, N, d]``, cot_mask ``[B, N]`` -> ``[B, H, N]``, 0 outside the CoT.
    A key unlike the others (low mean similarity) gets a high score.

    Computed in O(N d) per head, without the N x N similarity matrix: with unit keys
    ``u_i``, ``sum_{j != i} cos(k_i, k_j) = u_i . (sum_j u_j) - u_i . u_i`` over CoT keys.
    """
    u = torch.nn.functional.normalize(keys.float(), dim=-1)
    u = u * cot_mask[:, None, :, None]
    total = u.sum(2, keepdim=True)  # [B, H, 1, d]
    others = (u * total).sum(-1) - (u * u).sum(-1)  # [B, H, N]
    n_cot = cot_mask.sum(-1).clamp_min(1).float()[:, None, None]
    logits = (-others / n_cot).masked_fill(~cot_mask[:, None, :], NEG_INF)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def redundancy_scores_quadratic(keys: torch.Tensor, cot_mask: torch.Tensor) -> torch.Tensor:
    """The same scores as :func:`redundancy_scores` from the full ``[B, H, N, N]`` cosine
    matrix: the definition as written, kept as the reference the fast form is tested against."""
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = k @ k.transpose(-1, -2)  # [B, H, N, N]
    pair = cot_mask[:, None, :, None] & cot_mask[:, None, None, :]
    eye = torch.eye(keys.shape[2], dtype=torch.bool, device=keys.device)
    sim = sim.masked_fill(~pair | eye, 0.0)
    n_cot = cot_mask.sum(-1).clamp_min(1).float()[:, None, None]
    logits = (-sim.sum(-1) / n_cot).masked_fill(~cot_mask[:, None, :], NEG_INF)
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def rkv_scores(
    keys: torch.Tensor,
    queries: torch.Tensor | None,
    cot_mask: torch.Tensor,
    answer_mask: torch.Tensor | None,
    lam: float,
) -> torch.Tensor:
    """S = lam * importance + (1 - lam) * redundancy, ``[B, H_kv, N]``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    score = torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device)
    if lam > 0:
        if queries is None or answer_mask is None:
            raise ValueError("attention importance needs the answer queries and answer_mask")
        score = score + lam * attention_importance(keys, queries, cot_mask, answer_mask)
    if lam < 1:
        score = score + (1 - lam) * redundancy_scores(keys, cot_mask)
    return score


@register("rkv")
@dataclass
class RKVSelector(ScoreSelector):
    """R-KV eviction as the KaVa paper describes it: ``lam`` weighs answer attention against key
    redundancy. The selection kava's experiments use (unchanged); R-KV's own reference code scores
    differently, see ``rkv_pooled`` (:mod:`.rkv_pooled`)."""

    lam: float = 0.1
    name: str = "rkv"

    @property
    def needs_queries(self) -> bool:  # type: ignore[override]
        return self.lam > 0

    def score(self, r: SelectRequest) -> torch.Tensor:
        return rkv_scores(r.keys, r.queries, r.cot_mask, r.answer_mask, self.lam)


register("attention", lambda lam: RKVSelector(lam=1.0, name="attention"))  # R-KV's importance term alone
register("redundancy", lambda lam: RKVSelector(lam=0.0, name="redundancy"))  # R-KV's redundancy term alone

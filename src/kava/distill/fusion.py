"""Distil from several teachers at once: per-slot distances and how to weigh the teachers."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..losses import kv_slot_distance as slot_distance  # noqa: F401  (the per-slot KV distance fused here)

FUSIONS = ("fixed", "similarity", "router")
ROUTERS = ("mlp", "gate", "attention")


def slot_valid(valid: torch.Tensor) -> torch.Tensor:
    """``[L, B, H, M] -> [B, M]``: a slot counts when valid in any layer or head."""
    return valid.any(0).any(1)


class Fusion(nn.Module):
    """Weighs K teachers per slot (fixed, by similarity, or by a learned router) into one loss."""

    def __init__(
        self,
        kind: str,
        n_teachers: int,
        weights: list[float] | None = None,
        router: str = "mlp",
        student_dim: int = 0,
        teacher_dims: list[int] | None = None,
        hidden: int = 64,
        temperature: float = 1.0,
        entropy_weight: float = 0.0,
    ):
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"unknown fusion {kind!r}; choose from {', '.join(FUSIONS)}")
        if kind == "router" and router not in ROUTERS:
            raise ValueError(f"unknown router {router!r}; choose from {', '.join(ROUTERS)}")
        self.kind, self.router, self.k = kind, router, n_teachers
        self.temperature, self.entropy_weight = temperature, entropy_weight
        w = torch.ones(n_teachers) if weights is None else torch.tensor(weights, dtype=torch.float32)
        if w.shape != (n_teachers,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need {n_teachers} non-negative fusion weights, got {weights}")
        self.register_buffer("fixed", w / w.sum(), persistent=False)
        if kind != "router":
            return
        if student_dim < 1:
            raise ValueError("a router needs student_dim")
        if router == "mlp":
            self.net = nn.Sequential(nn.Linear(student_dim, hidden), nn.GELU(), nn.Linear(hidden, n_teachers))
        elif router == "gate":
            self.net = nn.Linear(student_dim, n_teachers)
        else:
            if teacher_dims is None or len(teacher_dims) != n_teachers:
                raise ValueError("an attention router needs one teacher_dims entry per teacher")
            self.query = nn.Linear(student_dim, hidden)
            self.keys = nn.ModuleList(nn.Linear(f, hidden) for f in teacher_dims)

    def _probs(self, similarities, student_state, teacher_summaries) -> torch.Tensor:
        """Unmasked teacher probabilities ``[K, B, M]``."""
        k, b, m = similarities.shape
        if self.kind == "fixed":
            return self.fixed[:, None, None].expand(k, b, m)
        if self.kind == "similarity":
            return (similarities.detach().float() / self.temperature).softmax(0)
        s = student_state.detach().float()  # [B, M, D]
        if self.router == "attention":
            q = self.query(s)  # [B, M, h]
            keys = torch.stack([lin(t.detach().float()) for lin, t in zip(self.keys, teacher_summaries)])
            logits = torch.einsum("bmh,kbmh->kbm", q, keys) / math.sqrt(q.shape[-1])
        else:
            logits = self.net(s).permute(2, 0, 1)
        return logits.softmax(0)

    def forward(self, distances, similarities, valid, student_state=None, teacher_summaries=None):
        """distances / similarities ``[K, B, M]``, valid ``[K, B, M]`` bool, student_state
        ``[B, M, D]``, teacher_summaries K tensors ``[B, M, F_i]``.

        Returns ``(loss, weights [K, B, M], metrics)``. Teachers without a slot get weight 0
        there; slots no teacher has are ignored. The entropy regulariser (router only) is
        ``log n - H(w)`` per slot, n the number of teachers that have it.
        """
        w = self._probs(similarities, student_state, teacher_summaries) * valid
        w = w / w.sum(0, keepdim=True).clamp_min(1e-12)
        slot = valid.any(0).float()  # [B, M]
        n_slots = slot.sum().clamp_min(1.0)
        loss = (w * distances.float()).sum(0).mul(slot).sum() / n_slots
        entropy = -(w * w.clamp_min(1e-12).log()).sum(0)  # [B, M]
        if self.kind == "router" and self.entropy_weight:
            gap = valid.sum(0).clamp_min(1).float().log() - entropy
            loss = loss + self.entropy_weight * (gap * slot).sum() / n_slots
        with torch.no_grad():
            metrics = {f"w{i}": ((w[i] * slot).sum() / n_slots).detach() for i in range(self.k)}
            metrics["router_entropy"] = ((entropy * slot).sum() / n_slots).detach()
        return loss, w, metrics

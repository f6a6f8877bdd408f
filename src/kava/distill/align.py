"""Align a teacher of another shape (layers, KV heads, head size, hidden size) with the student.

The teacher's compressed KV is mixed onto the student's layers and its heads and head dims
are flattened into one feature axis of size ``F``; the student's KV (and CODI hidden states)
is mapped into that space by learned per-layer linear maps. The teacher side is a fixed target
(only the ``weighted`` layer mixing learns), so the adapters cannot collapse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

AGGREGATIONS = ("interp", "mean", "weighted", "concat")


@dataclass(frozen=True)
class KVShape:
    """The cache geometry of a model."""

    layers: int
    kv_heads: int
    head_dim: int
    hidden: int


def _depth(n_teacher: int, n_student: int) -> tuple[torch.Tensor, int]:
    """Teacher depth ``p = l*(Lt-1)/(Ls-1)`` (``Lt-1`` when ``Ls == 1``) of each student layer,
    exactly, as ``(numerator [Ls] long, denominator)``."""
    if n_student == 1:
        return torch.tensor([n_teacher - 1]), 1
    return torch.arange(n_student) * (n_teacher - 1), n_student - 1


def layer_weights(n_teacher: int, n_student: int, kind: str) -> torch.Tensor:
    """Mixing matrix ``[n_student, n_teacher]`` float32, rows summing to 1.

    interp / weighted: student layer ``l`` sits at teacher depth ``p = l*(Lt-1)/(Ls-1)``
    (``Lt-1`` when ``Ls == 1``) and takes ``1-frac(p)`` of ``floor(p)`` and ``frac(p)`` of
    ``ceil(p)``. mean: uniform over the teacher layers ``t`` with ``floor(t*Ls/Lt) == l``; an
    empty bucket (``Lt < Ls``) takes teacher layer ``round(p)``.
    """
    if kind not in AGGREGATIONS or kind == "concat":
        raise ValueError(f"no layer weights for aggregation {kind!r}")
    num, den = _depth(n_teacher, n_student)
    rows = torch.arange(n_student)
    w = torch.zeros(n_student, n_teacher)
    if kind in ("interp", "weighted"):
        lo, frac = num // den, (num % den).float() / den
        w[rows, lo] += 1 - frac
        w[rows, (lo + (num % den > 0).long()).clamp_max(n_teacher - 1)] += frac
        return w
    bucket = torch.arange(n_teacher) * n_student // n_teacher  # [Lt]
    w[bucket, torch.arange(n_teacher)] = 1.0
    empty = w.sum(1) == 0
    w[rows[empty], ((2 * num + den) // (2 * den))[empty]] = 1.0
    return w / w.sum(1, keepdim=True)


def concat_windows(n_teacher: int, n_student: int) -> torch.Tensor:
    """``[n_student, k]`` long: student layer ``l`` concatenates ``k = ceil(Lt/Ls)`` consecutive
    teacher layers starting at ``round(l*(Lt-k)/(Ls-1))`` (0 when ``Ls == 1``)."""
    k = -(-n_teacher // n_student)
    den = max(n_student - 1, 1)
    start = (2 * torch.arange(n_student) * (n_teacher - k) + den) // (2 * den)
    return start[:, None] + torch.arange(k)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[L, B, H, M, d] -> [L, B, M, H*d]`` float."""
    l, b, h, m, d = x.shape
    return x.float().permute(0, 1, 3, 2, 4).reshape(l, b, m, h * d)


def _linear_init(n: int, fan_in: int, fan_out: int) -> tuple[nn.Parameter, nn.Parameter]:
    """``n`` stacked maps ``[n, fan_in, fan_out]`` + bias ``[n, fan_out]``: identity when square,
    else uniform(+-1/sqrt(fan_in)) like ``nn.Linear``."""
    if fan_in == fan_out:
        w, b = torch.eye(fan_in).repeat(n, 1, 1), torch.zeros(n, fan_out)
    else:
        bound = 1 / math.sqrt(fan_in)
        w = torch.empty(n, fan_in, fan_out).uniform_(-bound, bound)
        b = torch.empty(n, fan_out).uniform_(-bound, bound)
    return nn.Parameter(w), nn.Parameter(b)


class TeacherAligner(nn.Module):
    """Maps one teacher's compressed KV (and CODI hidden states) onto the student's layers, and
    the student's KV/hidden into that teacher's feature space, to compare them slot by slot."""

    def __init__(self, student: KVShape, teacher: KVShape, aggregation: str = "interp"):
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}")
        self.student, self.teacher, self.aggregation = student, teacher, aggregation
        self.identity = student == teacher and aggregation in ("interp", "mean")
        if self.identity:
            return
        ls, lt = student.layers, teacher.layers
        feat = teacher.kv_heads * teacher.head_dim
        if aggregation == "concat":
            self.register_buffer("windows", concat_windows(lt, ls), persistent=False)
            self.features = self.windows.shape[1] * feat
        else:
            init = layer_weights(lt, ls, aggregation)
            if aggregation == "weighted":
                self.layer_logits = nn.Parameter(init.clamp_min(1e-4).log())
            else:
                self.register_buffer("mix", init, persistent=False)
            self.features = feat
        self.k_weight, self.k_bias = _linear_init(ls, student.kv_heads * student.head_dim, self.features)
        self.v_weight, self.v_bias = _linear_init(ls, student.kv_heads * student.head_dim, self.features)
        self.h_weight, self.h_bias = _linear_init(ls, student.hidden, teacher.hidden)

    def mixing(self) -> torch.Tensor:
        """Current teacher-layer weights ``[Ls, Lt]`` (interp / mean / weighted)."""
        return self.layer_logits.softmax(-1) if self.aggregation == "weighted" else self.mix

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher ``[Lt, B, ..., F]`` -> ``[Ls, B, ..., F]`` (concat: window folded into ``F``)."""
        x = x.detach().float()
        if self.aggregation != "concat":
            return torch.einsum("st,t...->s...", self.mixing(), x)
        win = x[self.windows]  # [Ls, k, B, ..., F]
        return win.movedim(1, -2).flatten(-2)

    def teacher_kv(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        """keys/values ``[Lt, B, Ht, M, dt]``, valid ``[Lt, B, Ht, M]`` ->
        keys/values ``[Ls, B, 1, M, F]``, valid ``[Ls, B, 1, M]``.

        A student slot is valid when it is valid in every head of every teacher layer that has
        non-zero weight (concat: every layer of the window).
        """
        if self.identity:
            return keys, values, valid
        bad = (~valid.all(2)).float()  # [Lt, B, M]
        if self.aggregation == "concat":
            support = torch.zeros(self.student.layers, self.teacher.layers, device=bad.device)
            support.scatter_(1, self.windows, 1.0)
        else:
            support = (self.mixing().detach() > 0).float()
        out_valid = torch.einsum("st,tbm->sbm", support, bad) == 0
        return self._layers(_flat(keys)).unsqueeze(2), self._layers(_flat(values)).unsqueeze(2), out_valid.unsqueeze(2)

    def student_kv(self, keys: torch.Tensor, values: torch.Tensor):
        """Student keys/values ``[Ls, B, Hs, M, ds]`` -> ``[Ls, B, 1, M, F]`` by per-layer linear maps."""
        if self.identity:
            return keys, values
        k = torch.einsum("lbmi,lif->lbmf", _flat(keys), self.k_weight) + self.k_bias[:, None, None]
        v = torch.einsum("lbmi,lif->lbmf", _flat(values), self.v_weight) + self.v_bias[:, None, None]
        return k.unsqueeze(2), v.unsqueeze(2)

    def teacher_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[Lt, B, Dt] -> [Ls, B, Dt]`` (concat: mean over the window)."""
        if self.identity:
            return hidden
        if self.aggregation == "concat":
            return hidden.detach().float()[self.windows].mean(1)
        return self._layers(hidden)

    def student_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[Ls, B, Ds] -> [Ls, B, Dt]`` by a per-layer learned projection."""
        if self.identity:
            return hidden
        return torch.einsum("lbi,lio->lbo", hidden.float(), self.h_weight) + self.h_bias[:, None]

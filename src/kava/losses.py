"""The KaVa loss terms as pure tensor functions.

Every function takes plain tensors and returns a scalar; none touches a model. Teacher
tensors are detached here (stop-gradient), so callers may pass them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .names import CODI_LOSSES, KV_LOSSES


def elementwise(kind: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|x - y| (l1), (x - y)^2 (mse) or Huber with beta 1 (smooth_l1), element by element."""
    if kind == "l1":
        return (pred - target).abs()
    if kind == "mse":
        return (pred - target).square()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none")
    raise ValueError(f"unknown element loss {kind!r}")


def masked_layer_std(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Std of ``x [L, ..., d]`` per layer over the entries where ``mask [L, ...]`` is True.

    Returns ``[L]``, detached: a normaliser, not something to learn through.
    """
    x = x.detach().float()
    w = mask[..., None].expand_as(x).float()
    dims = tuple(range(1, x.dim()))
    count = w.sum(dims).clamp_min(1.0)
    mean = (x * w).sum(dims) / count
    centred = (x - mean.view(-1, *[1] * (x.dim() - 1))) * w
    return (centred.square().sum(dims) / count).sqrt().clamp_min(eps)


def _per_slot_cosine_magnitude(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - cos(pred, target) + | |pred| - |target| | / |target|, per slot ``[..., d] -> [...]``."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=eps)
    tn = target.float().norm(dim=-1)
    pn = pred.float().norm(dim=-1)
    return (1 - cos) + (pn - tn).abs() / tn.clamp_min(eps)


def kv_scale(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The KV loss normaliser: the per-layer std of ``keys`` and of ``values`` ``[L, B, ..., d]`` over the
    entries where ``mask`` is True (``mask`` broadcasts to ``keys.shape[:-1]``, e.g. ``[1, B, 1, N]``).

    Returns ``[2, L]`` (row 0 for K, row 1 for V), detached. Training computes it from the true
    teacher's whole CoT cache, whatever the selector, so every arm is scaled alike. It is
    :func:`scale_from_moments` of the batch's summed :func:`kv_moments`, so an offline cache that
    keeps each example's moments gives the same normaliser as the online pass.
    """
    return scale_from_moments(kv_moments(keys, values, mask).sum(0), eps)


def kv_moments(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per example, the count, sum and sum of squares of ``keys`` and ``values`` ``[L, B, ..., d]`` per
    layer over the entries where ``mask`` is True: ``[B, 2, L, 3]`` in float64, detached.

    Only the masked entries are lifted to float64 (the CoT is a fraction of the teacher sequence),
    and their sums go to their ``(layer, example)`` with ``index_add_``."""
    n_layers, b = keys.shape[:2]
    m = mask.expand(keys.shape[:-1])
    shape = (n_layers, b) + (1,) * (m.dim() - 2)
    group = torch.arange(n_layers * b, device=keys.device).view(shape).expand(m.shape)[m]  # [K]
    out = []
    for x in (keys, values):
        xs = x.detach()[m].double()  # [K, d]
        stats = torch.stack([torch.full_like(xs[:, 0], x.shape[-1]), xs.sum(-1), (xs * xs).sum(-1)], -1)  # [K, 3]
        sums = xs.new_zeros(n_layers * b, 3).index_add_(0, group, stats)
        out.append(sums.view(n_layers, b, 3))
    return torch.stack(out).permute(2, 0, 1, 3)  # [B, 2, L, 3]


def scale_from_moments(moments: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The per-layer std ``[2, L]`` (float32) from summed :func:`kv_moments` ``[2, L, 3]``."""
    n = moments[..., 0].clamp_min(1.0)
    mean = moments[..., 1] / n
    var = (moments[..., 2] / n - mean.square()).clamp_min(0.0)
    return var.sqrt().clamp_min(eps).float()


def kv_entry_distance(
    teacher: torch.Tensor,
    student: torch.Tensor,
    valid: torch.Tensor,
    kind: str = "l1",
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance of each cache entry ``[L, B, H, M, d] -> [L, B, H, M]``: the element loss averaged
    over dims, or for ``kind="cosine"`` the cosine + magnitude term. ``scale [L]`` (None: none)
    first divides both sides of layer ``l`` by ``scale[l]``. Nothing is detached; ``valid`` is
    not read (the callers mask)."""
    if kind not in KV_LOSSES:
        raise ValueError(f"unknown KV loss {kind!r}; choose from {', '.join(KV_LOSSES)}")
    t, s = teacher.float(), student.float()
    if scale is not None:
        if scale.shape != (t.shape[0],):
            raise ValueError(f"scale has shape {tuple(scale.shape)}; expected one value per layer ({t.shape[0]},)")
        std = scale.detach().float().view(-1, *[1] * (t.dim() - 1))
        t, s = t / std, s / std
    return _per_slot_cosine_magnitude(s, t) if kind == "cosine" else elementwise(kind, s, t).mean(-1)


def kv_loss(
    teacher_k: torch.Tensor,
    teacher_v: torch.Tensor,
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    valid: torch.Tensor,
    kind: str = "l1",
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_KV = (loss(K) + loss(V)) / 2 over the valid slots.

    Tensors ``[L, B, H, M, d]``; ``valid [L, B, H, M]`` bool (False slots never count).
    For the element losses the mean runs over layers, batch, heads, valid slots and dims,
    which is the paper's ``1/(2M) * (||K_t - K_s||_p^p + ||V_t - V_s||_p^p)`` averaged over
    layers, heads and dims. ``kind="cosine"`` averages the per-slot cosine + magnitude
    term instead. ``scale [2, L]`` (:func:`kv_scale`; None: unnormalised) divides both sides
    of layer ``l`` by ``scale[0, l]`` for K and ``scale[1, l]`` for V (detached).
    Returns 0 (with a gradient path) when no slot is valid.
    """
    sk, sv = (None, None) if scale is None else scale
    per = (
        kv_entry_distance(teacher_k.detach(), student_k, valid, kind, sk)
        + kv_entry_distance(teacher_v.detach(), student_v, valid, kind, sv)
    ) / 2
    w = valid.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def kv_slot_distance(
    teacher_k: torch.Tensor,
    teacher_v: torch.Tensor,
    student_k: torch.Tensor,
    student_v: torch.Tensor,
    valid: torch.Tensor,
    kind: str = "l1",
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The terms of :func:`kv_loss` per example and slot, ``[B, M]``: averaged over layers, heads
    and dims of the valid entries only (0 where a slot is valid nowhere). The teacher is not
    detached: aligned teacher KV is already cut from its model, and a learned layer mix of
    another teacher (:mod:`kava.distill.align`) learns through it. ``scale``: as for :func:`kv_loss`."""
    sk, sv = (None, None) if scale is None else scale
    per = (
        kv_entry_distance(teacher_k, student_k, valid, kind, sk)
        + kv_entry_distance(teacher_v, student_v, valid, kind, sv)
    ) / 2
    w = valid.float()
    return (per * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1.0)


def codi_loss(
    teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, kind: str = "l1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """CODI distillation at the position that predicts the first answer token.

    ``teacher_hidden`` / ``student_hidden``: ``[L, B, D]`` (one entry per layer). Each layer is
    divided by the teacher's std for that layer (detached), the element loss is averaged over
    dims, batch (``mask [B]`` selects examples) and layers.
    """
    if kind not in CODI_LOSSES:
        raise ValueError(f"unknown CODI loss {kind!r}; choose from {', '.join(CODI_LOSSES)}")
    t = teacher_hidden.detach().float()
    s = student_hidden.float()
    if mask is None:
        mask = torch.ones(t.shape[1], dtype=torch.bool, device=t.device)
    m = mask[None, :].expand(t.shape[0], -1)
    std = masked_layer_std(t, m)[:, None, None]
    per = elementwise(kind, s / std, t / std).mean(-1)  # [L, B]
    w = m.float()
    return (per * w).sum() / w.sum().clamp_min(1.0)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``labels`` are already aligned with ``logits`` (-100 ignored).

    Returns 0 when no label is set.
    """
    flat = labels.reshape(-1)
    if not (flat != -100).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=-100)


def kv_cosine(teacher: torch.Tensor, student: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between teacher and student entries over valid slots (a metric)."""
    cos = F.cosine_similarity(teacher.detach().float(), student.detach().float(), dim=-1)
    w = valid.float()
    return (cos * w).sum() / w.sum().clamp_min(1.0)


def labelled_ce(head, hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`token_ce` of ``head(hidden)`` with the head applied only where ``labels`` are set.

    ``hidden [B, N, D]``, ``labels [B, N]`` aligned with it (-100: nothing to predict);
    ``index``: the flat positions (``b * N + n``) that carry a label, when the batch builder
    already knows them (then nothing here waits for the device). The same value and gradients
    as ``token_ce(head(hidden), labels)`` without the logits of the unlabelled positions. 0
    (with a gradient path) when nothing is labelled.
    """
    flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if index is None:
        index = (flat_y != -100).nonzero().squeeze(-1)
    if index.numel() == 0:
        return hidden.sum() * 0.0
    return F.cross_entropy(head(flat_h.index_select(0, index)).float(), flat_y.index_select(0, index))


@torch.no_grad()
def answer_accuracy(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of examples whose greedy prediction at one position is its label (a metric).

    ``hidden [B, D]`` at each example's position (e.g. the CODI position, which predicts the
    first answer token), ``labels [B]`` (-100: not counted). 0 when nothing is counted.
    """
    keep = labels != -100
    hits = (head(hidden).argmax(-1) == labels) & keep
    return hits.float().sum() / keep.float().sum().clamp_min(1.0)

"""The optimizer: AdamW over the run's parameter groups (the projection's own learning rate, no
decay on biases and norms, the target source's trained parts), torch's fused kernel where it
has one for every parameter."""

from __future__ import annotations

import logging

import torch

from ..config import KavaConfig
from ..distill.objective import Objective

log = logging.getLogger("kava.train")


def fused_unsupported(params: list[torch.Tensor]) -> str | None:
    """Why torch's fused AdamW cannot update ``params`` (a device without its kernel, a
    non-float parameter), or None when it can."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older or newer torch without that helper: the two devices known to have it
        devices = {"cpu", "cuda"}
    for p in params:
        if p.device.type not in devices:
            return f"no fused AdamW kernel for device {p.device.type}"
        if not torch.is_floating_point(p):
            return f"a {p.dtype} parameter"
    return None


def make_optimizer(groups: list[dict], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``groups``: torch's fused kernel when ``fused`` and every parameter allows it
    (one kernel over all tensors instead of a Python loop over them; the same updates to rounding),
    else the for-loop AdamW, saying once why. A resumed run keeps the implementation its
    checkpoint's optimizer state names (torch restores ``fused`` with the param groups)."""
    if fused:
        why = fused_unsupported([p for g in groups for p in g["params"]])
        if why is None:
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
        log.info("train.fused_optimizer: %s; using the for-loop AdamW", why)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def param_groups(objective: Objective, cfg: KavaConfig) -> list[dict]:
    proj_lr = cfg.train.projection_lr or cfg.train.lr
    groups = {"decay": [], "no_decay": [], "proj_decay": [], "proj_no_decay": []}
    for name, p in objective.model.named_parameters():
        if not p.requires_grad:
            continue
        proj = name.startswith("projection.")
        key = ("proj_" if proj else "") + ("decay" if p.ndim >= 2 else "no_decay")
        groups[key].append(p)
    # What the target source trains (aligners, layer mixes and the router of other teachers):
    # no decay (adapters start at the identity).
    groups["teachers"] = objective.source.trained_parameters()
    wd = cfg.train.weight_decay
    spec = [
        ("decay", cfg.train.lr, wd),
        ("no_decay", cfg.train.lr, 0.0),
        ("proj_decay", proj_lr, wd),
        ("proj_no_decay", proj_lr, 0.0),
        ("teachers", cfg.teachers.adapter_lr or cfg.train.lr, 0.0),
    ]
    return [{"params": groups[k], "lr": lr, "weight_decay": w} for k, lr, w in spec if groups[k]]

"""Where a student's distillation targets come from: one :class:`TargetSource` a file, found by
name in :data:`SOURCES` or picked from the config by :func:`build_source`.

``self`` (:mod:`.own`): the student's own teacher pass (self-distillation, the default);
``cache`` (:mod:`.cache`): an offline cache of it (``loss.teacher_cache``); ``teachers``
(:mod:`.teachers`): other teachers, fused, with the own pass as one more when
``teachers.include_self``; ``counterfactual`` (:mod:`.counterfactual`): the own teacher reading a CoT
with wrong intermediate results (``loss.compression=counterfactual``).
"""

from __future__ import annotations

from typing import Callable

from ...config import ConfigError, KavaConfig
from ..compression import Selector, get_selector
from .base import Request, Student, Target, TargetSource, Terms, direct_terms
from .cache import OfflineCache, TeacherCache, TeacherCacheError
from .counterfactual import CounterfactualPass
from .own import OwnPass
from .teachers import ALIGN_FILE, TeacherSet

SOURCES: dict[str, Callable[..., TargetSource]] = {
    OwnPass.name: OwnPass,
    OfflineCache.name: OfflineCache,
    TeacherSet.name: TeacherSet,
    CounterfactualPass.name: CounterfactualPass,
}
"""Every target source by name; each is built as ``SOURCES[name](model, cfg)``."""


def kv_selector(cfg: KavaConfig) -> Selector | None:
    """The run's selector (``loss.compression``), or None when the run has no KV loss."""
    if cfg.loss.compression == "none" or cfg.loss.alpha_kv <= 0:
        return None
    return get_selector(cfg.loss.compression, cfg.loss.lam)


def _needs(sel: Selector) -> str:
    """What ``sel`` reads besides its example's own cache, in words (from its capabilities)."""
    parts = ["the rest of its batch"] * sel.whole_batch + ["a second teacher pass"] * sel.second_pass
    parts += ["the teacher batch's token types"] * sel.needs_token_types
    return " and ".join(parts)


def check_targets(cfg: KavaConfig) -> None:
    """Stop, naming the field, where the run's selector cannot be served by the target source
    the config asks for; every rule derives from the selector's declared capabilities
    (:class:`kava.distill.compression.Selector`)."""
    sel = kv_selector(cfg)
    if sel is None:
        return
    name = cfg.loss.compression
    if sel.whole_batch and cfg.train.batch_size < 2:
        raise ConfigError(
            f"config field 'train.batch_size': the {name} selector makes an example's targets from the "
            "rest of its batch and needs at least 2 examples per batch"
        )
    if cfg.loss.teacher_cache and not sel.cacheable:
        raise ConfigError(
            f"config field 'loss.compression': {name!r} reads {_needs(sel)} and cannot be read from loss.teacher_cache"
        )
    if cfg.teachers.models and sel.own_teacher_only:
        raise ConfigError(
            f"config field 'loss.compression': {name!r} reads {_needs(sel)} of the student's own "
            "teacher; it cannot be combined with teachers.models"
        )


def source_name(cfg: KavaConfig) -> str:
    """The source a run's config asks for: ``teachers`` when ``teachers.models`` is set,
    ``cache`` when ``loss.teacher_cache`` is, ``counterfactual`` for a selector that reads a second
    teacher pass, else ``self`` (and always ``self`` outside
    ``train.mode=kava``, where no targets are used)."""
    if cfg.train.mode != "kava":
        return OwnPass.name
    sel = kv_selector(cfg)
    if sel is not None and sel.second_pass:
        return CounterfactualPass.name
    if cfg.teachers.models:
        return TeacherSet.name
    if cfg.loss.teacher_cache:
        return OfflineCache.name
    return OwnPass.name


def build_source(model, cfg: KavaConfig, name: str | None = None) -> TargetSource:
    """The target source ``name`` (default: :func:`source_name` of ``cfg``) for ``model``."""
    return SOURCES[name or source_name(cfg)](model, cfg)


__all__ = [
    "ALIGN_FILE",
    "CounterfactualPass",
    "SOURCES",
    "OfflineCache",
    "OwnPass",
    "Request",
    "Student",
    "Target",
    "TargetSource",
    "check_targets",
    "kv_selector",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherSet",
    "Terms",
    "build_source",
    "direct_terms",
    "source_name",
]

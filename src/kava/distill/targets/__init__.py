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

from ...config import KavaConfig
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


def source_name(cfg: KavaConfig) -> str:
    """The source a run's config asks for: ``teachers`` when ``teachers.models`` is set,
    ``cache`` when ``loss.teacher_cache`` is, ``counterfactual`` for that control, else ``self`` (and always ``self`` outside
    ``train.mode=kava``, where no targets are used)."""
    if cfg.train.mode != "kava":
        return OwnPass.name
    if cfg.loss.compression == "counterfactual" and cfg.loss.alpha_kv > 0:
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
    "TeacherCache",
    "TeacherCacheError",
    "TeacherSet",
    "Terms",
    "build_source",
    "direct_terms",
    "source_name",
]

"""Moved to :mod:`kava.model.teacher`; this module re-exports it."""

from .model.teacher import (  # noqa: F401
    TeacherOutput,
    apply_rope,
    capture_answer_queries,
    rope_at,
    rotate_half,
    teacher_forward,
    undo_rope,
)

"""Moved to :mod:`kava.data.sequences`; this module re-exports it."""

from .data.sequences import (  # noqa: F401
    BOT,
    EOT,
    IGNORE,
    Encoded,
    SequenceError,
    TextEncoder,
    label_index,
    latent_count,
    prompt_batch,
    student_batch,
    teacher_batch,
    teacher_steps,
    to_device,
)

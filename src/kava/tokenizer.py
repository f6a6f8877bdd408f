"""Moved to :mod:`kava.model.tokenizer`; this module re-exports it."""

from .model.tokenizer import PATTERN, SPECIALS, WORDS, build_synthetic_tokenizer  # noqa: F401

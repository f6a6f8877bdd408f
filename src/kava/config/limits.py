"""Sanity bounds on every size and count (:class:`LimitsConfig`), checked before anything is
loaded or built: a value beyond one is refused in one line naming the field and the bound, and
a model built in code whose training would not fit in the machine's memory is refused too."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .fields import _check, _f


def physical_memory_bytes() -> int:
    """The machine's RAM in bytes (0: unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


@dataclass
class LimitsConfig:
    """Sanity bounds, checked with the rest of the config before anything is loaded or built. A
    value beyond one is refused naming both; raise the bound (``limits.NAME=VALUE``) if you mean it."""

    max_batch_size: int = _f(
        4096, "largest train.batch_size, train.effective_batch, eval.batch_size, eval.instrument_examples"
    )
    max_steps: int = _f(10_000_000, "largest train.max_steps (and steps of train.epochs)")
    max_epochs: float = _f(10_000.0, "largest train.epochs")
    max_latents: int = _f(1024, "largest latent.num_latents")
    max_iterations: int = _f(256, "largest latent.iterations")
    max_width: int = _f(16384, "largest hidden, head, MLP, LoRA, projection and router width of a model")
    max_layers: int = _f(256, "largest model.tiny.num_layers")
    max_positions: int = _f(131072, "largest model.tiny.max_position_embeddings")
    max_tokens: int = _f(
        32768, "largest data.max_question_tokens, data.max_cot_tokens, eval.max_new_tokens, eval.max_cot_tokens"
    )
    max_examples: int = _f(10_000_000, "largest data.synthetic_train_size and data.synthetic_test_size")
    max_threads: int = _f(1024, "largest train.num_threads")
    memory_fraction: float = _f(
        0.9,
        "a model built in code whose rough training footprint (weights, AdamW state, "
        "activations) exceeds this fraction of the machine's RAM is refused "
        "(0: no memory check)",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(getattr(self, f.name) >= 0, f"limits.{f.name}", "must be >= 0")


def _bounded(value: float, bound: float, name: str, limit: str) -> None:
    shown = lambda v: f"{v:,}" if isinstance(v, int) else f"{v:g}"  # noqa: E731
    _check(
        value <= bound,
        name,
        f"{shown(value)} is beyond the sanity bound limits.{limit}={shown(bound)} "
        f"(set limits.{limit}=N to raise it if you mean it)",
    )


def tiny_footprint_bytes(t, batch: int, positions: int, passes: int) -> int:
    """A rough lower estimate of training a model built in code: float32 weights, gradients and
    AdamW's two moments (16 bytes a parameter), and the activations of ``passes`` forward passes
    over ``batch`` sequences of ``positions`` tokens kept for the backward pass."""
    head = t.head_dim or t.hidden_size // max(t.num_heads, 1)
    vocab = 512  # the synthetic tokenizers hold fewer
    layer = t.hidden_size * head * (2 * t.num_heads + 2 * t.num_kv_heads) + 3 * t.hidden_size * t.intermediate_size
    params = t.num_layers * layer + 2 * vocab * t.hidden_size
    per_token = 8 * t.hidden_size + 2 * t.intermediate_size + t.num_heads * positions
    acts = passes * batch * positions * t.num_layers * per_token
    return 16 * params + 4 * acts


def check_limits(cfg) -> None:
    """Every size and count of ``cfg`` (a :class:`~kava.config.KavaConfig`) against its
    :class:`LimitsConfig`, and against each other, before anything is loaded or built."""
    # Kept whole (over 60 lines): one bound after another, in the order the config lists its fields.
    lim, t, d, e, lat = cfg.limits, cfg.train, cfg.data, cfg.eval, cfg.latent
    for name, v in (
        ("train.batch_size", t.batch_size),
        ("train.effective_batch", t.effective_batch),
        ("eval.batch_size", e.batch_size),
        ("eval.instrument_examples", e.instrument_examples),
    ):
        _bounded(v, lim.max_batch_size, name, "max_batch_size")
    _bounded(t.max_steps, lim.max_steps, "train.max_steps", "max_steps")
    _bounded(t.epochs, lim.max_epochs, "train.epochs", "max_epochs")
    _bounded(t.num_threads, lim.max_threads, "train.num_threads", "max_threads")
    _bounded(lat.num_latents, lim.max_latents, "latent.num_latents", "max_latents")
    _bounded(lat.iterations, lim.max_iterations, "latent.iterations", "max_iterations")
    for name, v in (
        ("data.max_question_tokens", d.max_question_tokens),
        ("data.max_cot_tokens", d.max_cot_tokens),
        ("eval.max_new_tokens", e.max_new_tokens),
        ("eval.max_cot_tokens", e.max_cot_tokens),
    ):
        _bounded(v, lim.max_tokens, name, "max_tokens")
    for name, v in (
        ("data.synthetic_train_size", d.synthetic_train_size),
        ("data.synthetic_test_size", d.synthetic_test_size),
    ):
        _bounded(v, lim.max_examples, name, "max_examples")
    for name, v in (
        ("model.lora_r", cfg.model.lora_r),
        ("latent.projection_hidden", lat.projection_hidden),
        ("teachers.router_hidden", cfg.teachers.router_hidden),
    ):
        _bounded(v, lim.max_width, name, "max_width")
    tinies = [("model.tiny", cfg.model.tiny)] if cfg.model.name_or_path == "tiny" else []
    tinies += [
        (f"teachers.models[{i}].tiny", m.tiny) for i, m in enumerate(cfg.teachers.models) if m.name_or_path == "tiny"
    ]
    for prefix, tiny in tinies:
        for name in ("hidden_size", "intermediate_size", "head_dim"):
            _bounded(getattr(tiny, name), lim.max_width, f"{prefix}.{name}", "max_width")
        _bounded(tiny.num_layers, lim.max_layers, f"{prefix}.num_layers", "max_layers")
        _bounded(tiny.max_position_embeddings, lim.max_positions, f"{prefix}.max_position_embeddings", "max_positions")
        _check(
            lat.num_latents + 8 <= tiny.max_position_embeddings,
            f"{prefix}.max_position_embeddings",
            f"{tiny.max_position_embeddings} positions cannot hold latent.num_latents={lat.num_latents} latents "
            "with a question and an answer",
        )
    ram = physical_memory_bytes()
    if lim.memory_fraction and ram and cfg.model.name_or_path == "tiny":
        passes = (lat.num_latents if lat.scheme == "sequential" else lat.iterations) + 2
        positions = min(cfg.model.tiny.max_position_embeddings, 64 + lat.num_latents)  # a short example
        need = tiny_footprint_bytes(cfg.model.tiny, t.batch_size, positions, passes)
        _check(
            need <= lim.memory_fraction * ram,
            "model.tiny",
            f"training this model needs roughly {need / 2**30:,.1f} GiB (hidden_size "
            f"{cfg.model.tiny.hidden_size}, "
            f"{cfg.model.tiny.num_layers} layers, batch {t.batch_size}), more than limits.memory_fraction="
            f"{lim.memory_fraction:g} of this machine's {ram / 2**30:,.1f} GiB "
            "(set limits.memory_fraction=0 to skip the check)",
        )

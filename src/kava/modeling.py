"""Moved to :mod:`kava.model` (``backbone``, ``adapters``, ``recompute``, ``checkpoints``); this module re-exports it."""

from .model.adapters import add_latent_tokens, apply_adapter, fast_trainable_tokens, tied_embeddings  # noqa: F401
from .model.backbone import (  # noqa: F401
    SMOLLM2,
    KavaModel,
    LatentProjection,
    architecture_differences,
    build_model,
    check_init_from,
    find_smollm2_gguf,
    load_backbone,
    load_checkpoint,
    quantization_config,
    resolve_dtype,
)
from .model.checkpoints import CONFIG_FILE, WEIGHTS_FILE, ModelLoadError  # noqa: F401
from .model.recompute import enable_checkpointing  # noqa: F401

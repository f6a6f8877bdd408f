"""Model layer: the backbone and what kava adds to it (``<bot>``/``<eot>``, LoRA, the latent
projection: ``backbone``), the synthetic tokenizer, the teacher pass and the latent (student)
passes, checkpoints (``checkpoints`` alone reads and writes them; ``files`` reads weight files
safely). Imports only ``kava.data`` and kava's core modules."""

from .adapters import add_latent_tokens, apply_adapter, fast_trainable_tokens, tied_embeddings
from .backbone import (
    SMOLLM2,
    KavaModel,
    LatentProjection,
    architecture_differences,
    find_smollm2_gguf,
    load_backbone,
    quantization_config,
    resolve_dtype,
    wrap_backbone,
)
from .checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    BASE_DIR,
    CONFIG_FILE,
    KAVA_WEIGHTS,
    WEIGHTS_FILE,
    build_model,
    check_init_from,
    checkpoint_layout,
    checkpoint_tensors,
    find_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    plain_base_state,
    resolve_init_from,
    save_checkpoint,
    start_backbone,
    weight_files,
)
from .files import ModelLoadError
from .latent import LatentState, PrefixCache, cache_span, encode_prefix, final_pass, positions, run_latents
from .recompute import enable_checkpointing
from .teacher import TeacherOutput, capture_answer_queries, teacher_forward
from .tokenizer import build_synthetic_tokenizer

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_FILE",
    "BASE_DIR",
    "CONFIG_FILE",
    "KAVA_WEIGHTS",
    "SMOLLM2",
    "WEIGHTS_FILE",
    "KavaModel",
    "LatentProjection",
    "LatentState",
    "ModelLoadError",
    "PrefixCache",
    "TeacherOutput",
    "add_latent_tokens",
    "apply_adapter",
    "architecture_differences",
    "build_model",
    "build_synthetic_tokenizer",
    "cache_span",
    "capture_answer_queries",
    "check_init_from",
    "checkpoint_layout",
    "checkpoint_tensors",
    "enable_checkpointing",
    "encode_prefix",
    "fast_trainable_tokens",
    "final_pass",
    "find_checkpoint",
    "find_smollm2_gguf",
    "latest_checkpoint",
    "load_backbone",
    "resolve_init_from",
    "load_checkpoint",
    "load_weights",
    "plain_base_state",
    "positions",
    "quantization_config",
    "resolve_dtype",
    "run_latents",
    "save_checkpoint",
    "start_backbone",
    "teacher_forward",
    "tied_embeddings",
    "weight_files",
    "wrap_backbone",
]

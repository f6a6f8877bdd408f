"""The backbone, its latent-token additions, adapters, and checkpoints.

:class:`KavaModel` is one ``nn.Module`` holding the causal LM (optionally wrapped by
``peft``) and the projection MLP, so ``.to()``, ``.parameters()`` and the optimizer see
both. Checkpoints are a folder with ``kava_config.yaml``, ``tokenizer/`` and
``model.safetensors`` (never pickle), written atomically.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import KavaConfig, ModelConfig, config_from_dict, read_yaml
from .io import atomic_replace_dir
from .sequences import BOT, EOT

log = logging.getLogger(__name__)

CONFIG_FILE = "kava_config.yaml"
WEIGHTS_FILE = "model.safetensors"


class ModelLoadError(RuntimeError):
    """A model or checkpoint that cannot be loaded; the message names it."""


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
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlamaConfig(**common) if t.arch == "llama" else Qwen2Config(**common)
    config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = (LlamaForCausalLM if t.arch == "llama" else Qwen2ForCausalLM)(config)
    return model


def load_backbone(cfg: ModelConfig, seed: int = 0):
    """(tokenizer, causal LM) for ``cfg``: built in code, a local folder, a .gguf file, or the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tokenizer import build_synthetic_tokenizer

    if cfg.init_from:
        model = load_checkpoint(cfg.init_from)
        return model.tokenizer, model.merged_backbone()
    if cfg.name_or_path == "tiny":
        tok = build_synthetic_tokenizer()
        return tok, _tiny_model(cfg, tok, seed)
    path, gguf = cfg.name_or_path, cfg.gguf_file or None
    if path.endswith(".gguf"):
        p = Path(path)
        if not p.is_file():
            raise ModelLoadError(f"model.name_or_path: GGUF file {path} does not exist")
        path, gguf = str(p.parent), p.name
    kw = dict(trust_remote_code=cfg.trust_remote_code)
    if gguf:
        kw["gguf_file"] = gguf
    try:
        tok = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation, **kw
        )
    except OSError as e:
        raise ModelLoadError(f"model.name_or_path: cannot load {cfg.name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, model


def add_latent_tokens(tokenizer, model) -> tuple[int, int]:
    """Add ``<bot>``/``<eot>`` to the tokenizer and grow the embeddings; returns their ids."""
    new = [t for t in (BOT, EOT) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return tokenizer.convert_tokens_to_ids(BOT), tokenizer.convert_tokens_to_ids(EOT)


def _embedding_name(model) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.split(".")[-1]
    raise ModelLoadError("cannot find the input embedding module")


def apply_adapter(model, cfg: ModelConfig, token_ids: list[int]):
    """LoRA through peft (adapters + trainable rows for the new tokens) or full fine-tuning."""
    if cfg.adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        trainable_token_indices={_embedding_name(model): list(token_ids)},
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


_CACHE_KW = "cache" if "cache" in inspect.signature(__import__("transformers").LlamaModel.forward).parameters else "past_key_values"


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
            self.projection.to(device=w.device, dtype=w.dtype)
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
        """One decoder pass (no LM head); extends ``cache`` in place."""
        return self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=position_ids,
            use_cache=True,
            output_hidden_states=output_hidden_states,
            **{_CACHE_KW: cache},
        )

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.projection(h)

    def merged_backbone(self):
        """The backbone with any LoRA merged in (for starting another run from this one)."""
        b = self.backbone
        return b.merge_and_unload() if hasattr(b, "merge_and_unload") else b

    # --- checkpoints ----------------------------------------------------------------
    def weights_to_save(self) -> dict[str, torch.Tensor]:
        """Trained tensors; the whole backbone too when its base cannot be reloaded."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        full = self.cfg.model.adapter == "full" or not self.base_reloadable
        out = {}
        for n, t in self.state_dict().items():
            if full or n in trainable or n.startswith("projection."):
                out[n] = t.detach().to("cpu").clone().contiguous()
        return out

    def write_to(self, folder: Path) -> None:
        """Write config, tokenizer and weights into an existing folder (not atomic by itself)."""
        self.cfg.save(folder / CONFIG_FILE)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        save_file(self.weights_to_save(), str(folder / WEIGHTS_FILE), metadata={"format": "kava"})

    def save(self, path: str | Path) -> None:
        """Save atomically: the folder appears complete or not at all."""
        atomic_replace_dir(Path(path), self.write_to)


def build_model(cfg: KavaConfig, with_adapter: bool = True) -> KavaModel:
    """Load the backbone, add the latent tokens, apply LoRA or full fine-tuning."""
    tok, backbone = load_backbone(cfg.model, cfg.train.seed)
    ids = add_latent_tokens(tok, backbone)
    base_reloadable = cfg.model.name_or_path != "tiny" or bool(cfg.model.init_from)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
        if cfg.model.adapter == "lora":
            backbone.enable_input_require_grads()
    if with_adapter:
        backbone = apply_adapter(backbone, cfg.model, list(ids))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        return KavaModel(backbone, tok, cfg, base_reloadable)


def load_checkpoint(path: str | Path) -> KavaModel:
    """Rebuild a :class:`KavaModel` from a checkpoint folder written by :meth:`KavaModel.save`."""
    from transformers import AutoTokenizer

    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise ModelLoadError(f"{path}: not a kava checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = config_from_dict(read_yaml(cfg_file))
    model = build_model(cfg)
    model.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ModelLoadError(f"{weights}: unexpected tensors {unexpected[:3]}...")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = [n for n in missing if n in trainable or n.startswith("projection.")]
    if lost:
        raise ModelLoadError(f"{weights}: missing trained tensors {lost[:3]}...")
    return model

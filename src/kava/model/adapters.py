"""What kava adds to a backbone: the ``<bot>``/``<eot>`` tokens, and LoRA (through peft) with
trainable rows for them, or full fine-tuning."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..config import ModelConfig
from ..data.sequences import BOT, EOT
from .files import ModelLoadError


def add_latent_tokens(tokenizer, model, mean_resizing: bool = True) -> tuple[int, int]:
    """Add ``<bot>``/``<eot>`` to the tokenizer and grow the embeddings; returns their ids.

    New rows start from the distribution of the existing embeddings (``mean_resizing``), which
    matters for a pretrained model and not for one built in code.
    """
    new = [t for t in (BOT, EOT) if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_tokens(new, special_tokens=True)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=mean_resizing)
    return tokenizer.convert_tokens_to_ids(BOT), tokenizer.convert_tokens_to_ids(EOT)


def _module_name(model, target, what: str) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name.split(".")[-1]
    raise ModelLoadError(f"cannot find the {what} module")


def tied_embeddings(model) -> bool:
    """Whether the LM head shares its weight with the input embedding."""
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def apply_adapter(model, cfg: ModelConfig, token_ids: list[int]):
    """LoRA through peft (adapters + trainable rows for the new tokens) or full fine-tuning."""
    if cfg.adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    # The new tokens' rows are trained (and saved): in the input embedding, and in an untied LM
    # head too, whose rows a resize would otherwise draw at random, leave untrained and draw
    # again at every reload. A tied head shares the embedding's rows (peft ties them).
    rows = {_module_name(model, model.get_input_embeddings(), "input embedding"): list(token_ids)}
    if not tied_embeddings(model):
        rows[_module_name(model, model.get_output_embeddings(), "output embedding")] = list(token_ids)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        trainable_token_indices=rows,
        task_type="CAUSAL_LM",
    )
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [m for m in cfg.lora_target_modules if m not in names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise ModelLoadError(
            f"model.lora_target_modules: {unknown[0]!r} is not a module of this model; "
            f"its linear layers are {', '.join(linear)}"
        )
    with warnings.catch_warnings():
        # peft asks transformers 5 for its deprecated `is_gradient_checkpointing`: a FutureWarning on
        # every LoRA command that says nothing about the run (kava sets gradient checkpointing itself).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, lora)
    fast_trainable_tokens(peft_model)
    return peft_model


# --- the new-token rows without copying the vocabulary matrix ----------------------------
#
# peft's trainable-token layers build the merged weight (``W.index_copy(rows, deltas)``, a
# full vocab x d copy) on every call; on an LM head that copy is also kept for the backward
# pass and its full weight gradient computed, just to train two rows. With a tied Llama-3.2-1B
# that is ~0.5 GB copied per embedding / head call. The forward below gives the same values
# and gradients from the frozen matrix plus the few trained rows.


def _token_slots(layer, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [k], lookup [vocab] with the slot of each trained token or -1), cached per device."""
    cache = layer.__dict__.setdefault("_kava_slots", {})
    key = (name, str(device))
    if key not in cache:
        idx = torch.tensor(layer.token_indices[name], dtype=torch.long, device=device)
        vocab = layer.base_layer.weight.shape[0]
        lookup = torch.full((vocab,), -1, dtype=torch.long, device=device)
        lookup[idx] = torch.arange(len(idx), device=device)
        cache[key] = (idx, lookup)
    return cache[key]


def _trainable_tokens_forward(layer, slow, x, *args, **kwargs):
    active = layer.active_adapters
    base = layer.base_layer
    if layer.disable_adapters or layer.merged or len(active) != 1 or args or kwargs:
        return slow(x, *args, **kwargs)
    name = active[0]
    delta = layer.trainable_tokens_delta[name]
    if isinstance(base, nn.Embedding) and layer._get_embed_scale() is None:
        idx, lookup = _token_slots(layer, name, x.device)
        out = base(x)
        slot = lookup[x]
        return torch.where((slot >= 0).unsqueeze(-1), delta.to(out.dtype)[slot.clamp_min(0)], out)
    if isinstance(base, nn.Linear):
        idx, _ = _token_slots(layer, name, x.device)
        out = base(x)  # the frozen rows' logits; their weight needs no gradient
        out[..., idx] = nn.functional.linear(x, delta.to(x.dtype)).to(out.dtype)
        return out
    return slow(x, *args, **kwargs)


def fast_trainable_tokens(model) -> int:
    """Give every peft trainable-token layer in ``model`` the copy-free forward; returns how many."""
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # an older peft: keep its own forward
        return 0
    n = 0
    for mod in model.modules():
        if isinstance(mod, TrainableTokensLayer) and "_kava_fast" not in mod.__dict__:
            slow = mod.forward
            mod.forward = lambda x, *a, _m=mod, _slow=slow, **kw: _trainable_tokens_forward(_m, _slow, x, *a, **kw)
            mod._kava_fast = True
            n += 1
    return n

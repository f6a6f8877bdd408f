"""Batched greedy decoding with the KV cache in three modes.

* ``student``: ``Q <bot>``, the latent passes, then ``<eot> answer_prefix`` and greedy answer decoding.
* ``cot``: ``Q`` then greedy decoding of the chain of thought and the answer.
* ``nocot``: ``Q answer_prefix`` then greedy answer decoding.

Forward passes are counted per example as the decoder calls it needed (latent passes, the
prompt pass and one per generated token after the first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..config import KavaConfig
from ..data.sequences import prompt_batch, student_batch
from ..model.backbone import KavaModel
from ..model.latent import final_pass, positions, run_latents

MODES = ("student", "cot", "nocot")


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per example, up to and including <eos>
    passes: list[int]  # decoder calls each example needed
    kv_tokens: list[int]  # cache entries each example held at the end


@torch.no_grad()
def greedy(
    model: KavaModel,
    cache: DynamicCache,
    mask: torch.Tensor,
    last_h: torch.Tensor,
    max_new: int,
    passes_before: int,
    stop_at_eos: bool = True,
) -> Generation:
    """Greedy decoding from the hidden state ``last_h [B, D]`` of the last prompt position.

    ``mask [B, S]`` covers the ``S`` cached columns. Each example keeps its tokens up to and
    including its first <eos>, or ``max_new`` tokens when it emits none; the batch stops once
    every example has its <eos>. An example's passes are ``passes_before`` plus one per token
    it still needed after the first; its KV tokens are its prompt plus the tokens fed back.

    Decoding state stays on the device: ``tokens [B, max_new]``, ``kept [B]`` (tokens kept
    per example; an example that is done keeps decoding but nothing more is kept),
    ``passes [B]`` and ``done [B]``. The one host read per token is the ``done.all()`` check;
    the lists are built once at the end.

    ``stop_at_eos=False`` decodes exactly ``max_new`` tokens per example whatever they are
    (the benchmark does, so that random weights decode as many tokens as a trained model).
    """
    eos = model.tokenizer.eos_token_id
    b, device = last_h.shape[0], last_h.device
    tokens = torch.full((b, max_new), eos, dtype=torch.long, device=device)
    kept = torch.zeros(b, dtype=torch.long, device=device)
    passes = torch.full((b,), passes_before, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    prompt_tokens = mask.long().sum(-1)
    for t in range(max_new):
        nxt = model.lm_head(last_h).argmax(-1)
        tokens[:, t] = nxt
        kept += ~done
        if stop_at_eos:
            done |= nxt == eos
        if t == max_new - 1 or (stop_at_eos and bool(done.all())):
            break
        passes += ~done
        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        h = model.run(model.embed(nxt[:, None]), mask, positions(mask)[:, -1:], cache).last_hidden_state
        last_h = h[:, -1]
    kv = prompt_tokens + (kept - 1).clamp_min(0)
    rows = [row[:n] for row, n in zip(tokens.tolist(), kept.tolist())]
    return Generation(rows, passes.tolist(), kv.tolist())


def hit_cap(tokens: list[int], eos_id: int) -> bool:
    """True when a generation stopped at the token cap: it holds no <eos> (its last token)."""
    return not tokens or tokens[-1] != eos_id


@dataclass
class Prefilled:
    """A batch after its prompt passes, ready for :func:`greedy`."""

    cache: DynamicCache  # the prompt (and, in student mode, the latents)
    mask: torch.Tensor  # [B, S] attention mask over the S cached columns
    last_h: torch.Tensor  # [B, D] hidden state of the last prompt position
    passes: int  # decoder calls made so far (each example made the same)


@torch.no_grad()
def prefill(model: KavaModel, encs, mode: str, cfg: KavaConfig) -> Prefilled:
    """Run the prompt of `mode` for a batch: ``Q <bot>`` + latents + ``<eot> answer_prefix``
    (student), ``Q`` (cot) or ``Q answer_prefix`` (nocot)."""
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    if mode == "student":
        lat = cfg.latent
        sb = student_batch(encs, pad, model.bot_id, model.eot_id, lat.num_latents, with_answer=False)
        state = run_latents(
            model,
            sb["prefix_ids"].to(device),
            sb["prefix_mask"].to(device),
            lat.num_latents,
            lat.scheme,
            lat.iterations,
        )
        out, mask, _ = final_pass(model, state, sb["suffix_ids"].to(device), sb["suffix_mask"].to(device))
        return Prefilled(state.cache, mask, out.last_hidden_state[:, -1], state.passes)
    pb = prompt_batch(encs, pad, with_prefix=(mode == "nocot"))
    ids, mask = pb["input_ids"].to(device), pb["attention_mask"].to(device)
    cache = DynamicCache()
    h = model.run(model.embed(ids), mask, positions(mask), cache).last_hidden_state
    return Prefilled(cache, mask, h[:, -1], 1)


def token_cap(mode: str, cfg: KavaConfig) -> int:
    """Tokens `mode` may generate: ``eval.max_cot_tokens`` for cot, else ``eval.max_new_tokens``."""
    return cfg.eval.max_cot_tokens if mode == "cot" else cfg.eval.max_new_tokens


@torch.no_grad()
def generate(model: KavaModel, encs, mode: str, cfg: KavaConfig, max_new: int | None = None) -> Generation:
    """Greedy generations of a batch in `mode` (student, cot or nocot), at most ``max_new``
    tokens each (default :func:`token_cap`)."""
    p = prefill(model, encs, mode, cfg)
    return greedy(model, p.cache, p.mask, p.last_h, max_new or token_cap(mode, cfg), p.passes)


def graded_text(generation: str, mode: str, cfg: KavaConfig) -> str:
    """The text a generation is graded on: in student and nocot mode the answer prefix (part of
    the prompt) + the generation, in cot mode the generation itself."""
    return generation if mode == "cot" else cfg.data.answer_prefix + generation


def kv_bytes_per_token(model: KavaModel) -> int:
    c = model.base_model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * elem

"""Teacher mode: one forward pass over ``Q C A`` that yields the CE loss, the hidden states
for CODI, the KV-cache of every layer and KV head, and the queries at the answer positions
(recomputed from each attention module's input, so any attention kernel can be used)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .. import losses
from .backbone import KavaModel
from .latent import PrefixCache, cache_span, positions


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., n, d]`` by angles whose ``cos``/``sin`` broadcast to it."""
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`apply_rope` (rotation by the opposite angle)."""
    return x * cos - rotate_half(x) * sin


def rope_at(model: KavaModel, like: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of the model's rotary embedding at ``pos [B, n]`` -> ``[B, n, d]`` each."""
    rotary = getattr(model.decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError("loss.rope=pre needs a model with a rotary embedding (decoder.rotary_emb)")
    return rotary(like, pos)


@contextmanager
def capture_answer_queries(model: KavaModel, answer_pos: torch.Tensor, store: list):
    """Record, for every layer, the post-RoPE queries at ``answer_pos [B, A]`` -> ``[B, H_q, A, d]``.

    The queries are the ones the attention used: a forward hook on each ``q_proj`` keeps its
    output rows at the answer positions (LoRA dropout included, never drawn a second time), and
    a hook on the attention module applies that layer's ``q_norm`` (if any) and the rotary
    angles it received. No attention matrix is materialised. Hooks are removed on exit,
    whatever happens.
    """
    handles = []
    mods = model.attention_modules()
    store.clear()
    store.extend([None] * len(mods))
    raw: list = [None] * len(mods)
    idx = answer_pos[..., None]

    def make_proj(i):
        def hook(module, args, output):
            raw[i] = output.detach().gather(1, idx.expand(-1, -1, output.shape[-1]))  # [B, A, H_q * d]

        return hook

    def make_attn(i):
        def hook(module, args, kwargs, output):
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                q_rows = raw[i]
                head_dim = getattr(module, "head_dim", cos.shape[-1])
                q = q_rows.view(q_rows.shape[0], q_rows.shape[1], -1, head_dim)
                if hasattr(module, "q_norm"):
                    q = module.q_norm(q)
                q = q.transpose(1, 2)
                b = q_rows.shape[0]
                c = cos.expand(b, -1, -1).gather(1, idx.expand(-1, -1, cos.shape[-1]))[:, None]
                s = sin.expand(b, -1, -1).gather(1, idx.expand(-1, -1, sin.shape[-1]))[:, None]
                store[i] = apply_rope(q, c.to(q.dtype), s.to(q.dtype))
                raw[i] = None

        return hook

    try:
        for i, mod in enumerate(mods):
            handles.append(mod.q_proj.register_forward_hook(make_proj(i)))
            handles.append(mod.register_forward_hook(make_attn(i), with_kwargs=True))
        yield store
    finally:
        for hd in handles:
            hd.remove()


@dataclass
class TeacherOutput:
    ce: torch.Tensor | None  # token CE over the labelled positions (None when not asked for)
    hidden: torch.Tensor  # [L, B, D] at the distillation position (detached)
    keys: torch.Tensor | None  # [L, B, H_kv, N, d] (detached; None when not asked for)
    values: torch.Tensor | None  # [L, B, H_kv, N, d] (detached)
    queries: torch.Tensor | None  # [L, B, H_q, A, d] at the answer positions, or None
    logits: torch.Tensor | None = None  # [B, N, V] over every position, only with want_logits
    # Share of examples whose greedy next token at the CODI position is the first answer token:
    # whether the teacher knows the answer the CODI target stands for (with want_ce).
    answer_acc: torch.Tensor | None = None


def teacher_forward(
    model: KavaModel,
    batch: dict,
    want_queries: bool,
    want_cache: bool = True,
    want_ce: bool = True,
    want_logits: bool = False,
    question: PrefixCache | None = None,
) -> TeacherOutput:
    """Run the teacher once over ``batch`` (from :func:`kava.data.sequences.teacher_batch`).

    ``want_ce``: the CE on ``batch["labels"]``, with the LM head applied at the labelled
    positions only (the question carries no labels; at a large vocabulary the head over every
    position is most of the teacher's head work). ``want_logits``: also the logits of every
    position (for inspection and tests; training never needs them). ``want_cache``: the KV
    cache of every position (without it none is built). ``question``: the batch's first
    ``question.length`` columns (its left-padded question, ``teacher_batch(question_left=True)``)
    already encoded (:func:`kava.model.latent.encode_prefix`): the pass reads the rest, ``C A``,
    from a fork of that cache; outputs cover the whole sequence as without it.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    q = 0
    if question is not None:
        q = question.length
        if batch.get("question_len") != q:
            raise ValueError(
                f"the teacher batch's question spans {batch.get('question_len')} columns, the encoded "
                f"question {q}: build it with teacher_batch(question_left=True)"
            )
    cache = question.fork() if question is not None else DynamicCache() if want_cache else None
    store: list = []
    embeds = model.embed(ids[:, q:] if q else ids)
    pos = positions(mask)[:, q:] if q else positions(mask)
    if want_queries:
        answer_pos = (batch["answer_pos"] - q).clamp_min(0)  # (padded entries are masked by answer_valid)
        with capture_answer_queries(model, answer_pos, store):
            out = model.run(embeds, mask, pos, cache, output_hidden_states=True)
    else:
        out = model.run(embeds, mask, pos, cache, output_hidden_states=True)
    last = out.last_hidden_state
    if q:  # the question's own states: the last of them predicts the first CoT token
        last = torch.cat([question.hidden, last], 1)
    ce = losses.labelled_ce(model.lm_head, last, batch["labels"], batch.get("label_index")) if want_ce else None
    logits = model.lm_head(last) if want_logits else None
    at = batch["distill_pos"]
    rows = torch.arange(ids.shape[0], device=ids.device)
    hidden = torch.stack([h[rows, at - q] for h in out.hidden_states[1:]]).detach()  # [L, B, D]
    acc = losses.answer_accuracy(model.lm_head, last[rows, at], batch["labels"][rows, at]) if want_ce else None
    keys = values = None
    if want_cache:
        keys, values = cache_span(cache, 0, ids.shape[1])
        keys, values = keys.detach(), values.detach()
    queries = torch.stack(store) if want_queries else None
    return TeacherOutput(ce, hidden, keys, values, queries, logits, acc)

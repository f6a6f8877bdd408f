"""Batched greedy inference with the KV cache in three modes, graded by the shared grader.

* ``student``: ``Q <bot>``, the latent passes, then ``<eot> answer_prefix`` and greedy answer decoding.
* ``cot``: ``Q`` then greedy decoding of the chain of thought and the answer.
* ``nocot``: ``Q answer_prefix`` then greedy answer decoding.

Forward passes are counted per example as the decoder calls it needed (latent passes, the
prompt pass and one per generated token after the first).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from .answers import is_correct
from .config import KavaConfig
from .data.schema import Example
from .io import atomic_write, atomic_write_json
from .latent import final_pass, positions, run_latents
from .modeling import KavaModel
from .sequences import TextEncoder, prompt_batch, student_batch

log = logging.getLogger(__name__)
MODES = ("student", "cot", "nocot")


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per example, up to and including <eos>
    passes: list[int]  # decoder calls each example needed
    kv_tokens: list[int]  # cache entries each example held at the end


@torch.no_grad()
def greedy(model: KavaModel, cache: DynamicCache, mask: torch.Tensor, last_h: torch.Tensor, max_new: int, passes_before: int) -> Generation:
    """Greedy decoding from the hidden state ``last_h [B, D]`` of the last prompt position."""
    eos = model.tokenizer.eos_token_id
    b = last_h.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=last_h.device)
    out: list[list[int]] = [[] for _ in range(b)]
    passes = [passes_before] * b
    prompt_tokens = mask.long().sum(-1).tolist()
    for t in range(max_new):
        nxt = model.lm_head(last_h).argmax(-1)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= nxt == eos
        if bool(done.all()) or t == max_new - 1:
            break
        for i in range(b):
            if not done[i]:
                passes[i] += 1
        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        h = model.run(model.embed(nxt[:, None]), mask, positions(mask)[:, -1:], cache).last_hidden_state
        last_h = h[:, -1]
    kv = [prompt_tokens[i] + max(len(out[i]) - 1, 0) for i in range(b)]
    return Generation(out, passes, kv)


@torch.no_grad()
def generate(model: KavaModel, encs, mode: str, cfg: KavaConfig) -> Generation:
    device = next(model.parameters()).device
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    if mode == "student":
        lat = cfg.latent
        sb = student_batch(encs, pad, model.bot_id, model.eot_id, lat.num_latents, with_answer=False)
        state = run_latents(model, sb["prefix_ids"].to(device), sb["prefix_mask"].to(device), lat.num_latents, lat.scheme, lat.iterations)
        out, mask, _ = final_pass(model, state, sb["suffix_ids"].to(device), sb["suffix_mask"].to(device))
        return greedy(model, state.cache, mask, out.last_hidden_state[:, -1], cfg.eval.max_new_tokens, state.passes)
    pb = prompt_batch(encs, pad, with_prefix=(mode == "nocot"))
    ids, mask = pb["input_ids"].to(device), pb["attention_mask"].to(device)
    cache = DynamicCache()
    h = model.run(model.embed(ids), mask, positions(mask), cache).last_hidden_state
    max_new = cfg.eval.max_cot_tokens if mode == "cot" else cfg.eval.max_new_tokens
    return greedy(model, cache, mask, h[:, -1], max_new, 1)


def kv_bytes_per_token(model: KavaModel) -> int:
    c = model.base_model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * elem


def evaluate(
    model: KavaModel,
    examples: list[Example],
    cfg: KavaConfig,
    modes: tuple[str, ...] | list[str] = ("student",),
    out_dir: str | Path | None = None,
    desc: str = "eval",
) -> dict[str, dict]:
    """Accuracy, mean forward passes, generated tokens, wall time and KV-cache size per mode.

    With ``out_dir``, writes ``predictions_<mode>.jsonl`` and ``eval_metrics.json`` there.
    """
    from tqdm.auto import tqdm

    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    encs = [encoder.encode(ex) for ex in examples]
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    bpt = kv_bytes_per_token(model)
    try:
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown eval mode {mode!r}; choose from {', '.join(MODES)}")
            preds = []
            start = time.perf_counter()
            bs = cfg.eval.batch_size
            for i in tqdm(range(0, len(encs), bs), desc=f"{desc}:{mode}", leave=False, disable=not cfg.train.progress):
                chunk_e, chunk_x = encs[i : i + bs], examples[i : i + bs]
                gen = generate(model, chunk_e, mode, cfg)
                for ex, toks, n_pass, kv in zip(chunk_x, gen.tokens, gen.passes, gen.kv_tokens):
                    text = model.tokenizer.decode(toks, skip_special_tokens=True)
                    if mode != "cot":
                        text = cfg.data.answer_prefix + text
                    preds.append({
                        "source_id": ex.source_id, "question": ex.question, "gold": ex.answer, "prediction": text,
                        "correct": is_correct(text, ex.answer), "forward_passes": n_pass,
                        "generated_tokens": len(toks), "kv_cache_bytes": kv * bpt,
                    })
            wall = time.perf_counter() - start
            n = max(len(preds), 1)
            results[mode] = {
                "n": len(preds),
                "accuracy": sum(p["correct"] for p in preds) / n,
                "forward_passes": sum(p["forward_passes"] for p in preds) / n,
                "generated_tokens": sum(p["generated_tokens"] for p in preds) / n,
                "kv_cache_bytes": sum(p["kv_cache_bytes"] for p in preds) / n,
                "peak_kv_cache_bytes": max((p["kv_cache_bytes"] for p in preds), default=0),
                "wall_time_s": wall,
            }
            if out_dir is not None:
                lines = "".join(json.dumps(p) + "\n" for p in preds)
                atomic_write(Path(out_dir) / f"predictions_{mode}.jsonl", lambda f, s=lines: f.write_text(s))
    finally:
        model.train(was_training)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "eval_metrics.json", results)
    return results

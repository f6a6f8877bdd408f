"""Student mode: latent thoughts by PCCoT Jacobi iterations or sequentially (Coconut/CODI).

Both schemes return the same :class:`LatentState`: a cache holding the question prefix
(``Q <bot>``, left-padded so latents share columns) and any latents already consumed, the
latent inputs still to be fed (``pending``), and the hidden states that produced every
latent. The caller then runs one final pass over ``pending`` + ``<eot> ...``, which both
training and generation do.

Forward passes: Jacobi uses ``T`` passes (the first one also reads the question, whose cache
is then kept and reused), sequential uses ``m`` (one per latent, the first reading the
question). The final pass makes ``T + 1`` / ``m + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .backbone import KavaModel


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids from a 2D attention mask (left padding aware): ``cumsum - 1``, >= 0."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@dataclass
class LatentState:
    cache: DynamicCache
    mask: torch.Tensor  # [B, cached + pending] attention mask including the pending inputs
    pending: torch.Tensor  # [B, k, D] latent inputs not yet fed (k = m for Jacobi, 1 for sequential)
    producers: torch.Tensor  # [B, m, D] hidden state that produced each latent (z_j = P(producers[:, j]))
    prefix_len: int  # P: columns of the (left-padded) prefix; latents start there
    num_latents: int
    passes: int  # decoder passes made so far


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Keep the first ``length`` columns of every layer (the question prefix)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def _step(model: KavaModel, embeds, mask, cache, new: int):
    out = model.run(embeds, mask, positions(mask)[:, -new:], cache)
    return out.last_hidden_state


def run_latents(
    model: KavaModel,
    prefix_ids: torch.Tensor,
    prefix_mask: torch.Tensor,
    num_latents: int,
    scheme: str,
    iterations: int,
) -> LatentState:
    """Compute the latent thoughts for a batch of prefixes ``Q <bot>`` (``[B, P]``)."""
    b, p = prefix_ids.shape
    m = num_latents
    if m < 1:
        raise ValueError("num_latents must be >= 1")
    cache = DynamicCache()
    prefix_emb = model.embed(prefix_ids)
    ones = prefix_mask.new_ones(b, m)
    if scheme == "jacobi":
        z = model.embed(torch.full((b, m), model.bot_id, dtype=torch.long, device=prefix_ids.device))
        mask = torch.cat([prefix_mask, ones], 1)
        h = _step(model, torch.cat([prefix_emb, z], 1), mask, cache, p + m)
        h_bot = h[:, p - 1 : p]
        producers = torch.cat([h_bot, h[:, p : p + m - 1]], 1)
        crop_cache(cache, p)
        for _ in range(iterations - 1):
            z = model.project(producers)
            h = _step(model, z, mask, cache, m)
            producers = torch.cat([h_bot, h[:, : m - 1]], 1)
            crop_cache(cache, p)
        return LatentState(cache, mask, model.project(producers), producers, p, m, iterations)
    if scheme == "sequential":
        mask = prefix_mask
        h = _step(model, prefix_emb, mask, cache, p)
        producers = [h[:, p - 1 : p]]
        for _ in range(m - 1):
            z = model.project(producers[-1])
            mask = torch.cat([mask, prefix_mask.new_ones(b, 1)], 1)
            producers.append(_step(model, z, mask, cache, 1))
        prod = torch.cat(producers, 1)
        mask = torch.cat([mask, prefix_mask.new_ones(b, 1)], 1)
        return LatentState(cache, mask, model.project(prod[:, -1:]), prod, p, m, m)
    raise ValueError(f"unknown latent scheme {scheme!r}")


def final_pass(model: KavaModel, state: LatentState, suffix_ids: torch.Tensor, suffix_mask: torch.Tensor, output_hidden_states: bool = False):
    """Feed the pending latents and the suffix (``<eot> ...``); returns the decoder output and
    the attention mask now covering everything. The cache then holds all latents."""
    k = state.pending.shape[1]
    embeds = torch.cat([state.pending, model.embed(suffix_ids)], 1)
    mask = torch.cat([state.mask, suffix_mask], 1)
    out = model.run(embeds, mask, positions(mask)[:, -(k + suffix_ids.shape[1]) :], state.cache, output_hidden_states)
    state.passes += 1
    return out, mask, k


def cache_span(cache: DynamicCache, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every layer at columns ``start:stop``: ``[L, B, H_kv, stop-start, d]``."""
    keys = torch.stack([layer.keys[:, :, start:stop] for layer in cache.layers])
    values = torch.stack([layer.values[:, :, start:stop] for layer in cache.layers])
    return keys, values

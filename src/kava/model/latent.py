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

import copy
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
    # The suffix's input embeddings, when run_latents was given the suffix ids (one embedding call per student)
    suffix_embeds: torch.Tensor | None = None


@dataclass
class PrefixCache:
    """A left-padded question ``Q`` encoded once (:func:`encode_prefix`): the teacher's ``Q C A`` and
    the student's ``Q <bot> ...`` both continue from it (:meth:`fork`), so its keys and values
    are computed, and back-propagated through, once."""

    cache: DynamicCache  # Q's keys and values (with their autograd graph)
    mask: torch.Tensor  # [B, Q] its attention mask
    hidden: torch.Tensor  # [B, Q, D] its last-layer hidden states

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def fork(self) -> DynamicCache:
        """A cache that starts as Q's and grows on its own: the layers hold the same tensors (a
        cache update concatenates into new ones), so every fork reads Q, and gradients from every
        fork meet in Q's pass."""
        new = copy.copy(self.cache)
        new.layers = [copy.copy(layer) for layer in self.cache.layers]
        return new


def encode_prefix(
    model: KavaModel, ids: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor | None = None
) -> PrefixCache:
    """One decoder pass over the left-padded question ``ids [B, Q]`` (``embeds``: its input
    embeddings, when already computed)."""
    cache = DynamicCache()
    out = model.run(model.embed(ids) if embeds is None else embeds, mask, positions(mask), cache)
    return PrefixCache(cache, mask, out.last_hidden_state)


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
    suffix_ids: torch.Tensor | None = None,
    question: PrefixCache | None = None,
) -> LatentState:
    """Compute the latent thoughts for a batch of prefixes ``Q <bot>`` (``[B, P]``).

    ``suffix_ids``: the final pass's suffix, embedded in the same call as the prefix (the
    state carries its embeddings for :func:`final_pass`). ``question``: the first
    ``question.length`` columns of the prefix already encoded (:func:`encode_prefix`); the
    first pass then reads only the rest of the prefix, from a fork of its cache.
    """
    b, p = prefix_ids.shape
    m = num_latents
    if m < 1:
        raise ValueError("num_latents must be >= 1")
    q = 0 if question is None else question.length
    cache = DynamicCache() if question is None else question.fork()
    # One embedding call for everything the student reads as tokens: the prefix (after Q when
    # Q is encoded already), the <bot> rows that start the Jacobi latents, and the suffix.
    pieces = [prefix_ids[:, q:]]
    if scheme == "jacobi":
        pieces.append(torch.full((b, m), model.bot_id, dtype=torch.long, device=prefix_ids.device))
    if suffix_ids is not None:
        pieces.append(suffix_ids)
    emb = model.embed(torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0])
    prefix_emb = emb[:, : p - q]
    suffix_emb = emb[:, emb.shape[1] - suffix_ids.shape[1] :] if suffix_ids is not None else None
    ones = prefix_mask.new_ones(b, m)
    if scheme == "jacobi":
        z = emb[:, p - q : p - q + m]
        mask = torch.cat([prefix_mask, ones], 1)
        h = _step(model, torch.cat([prefix_emb, z], 1), mask, cache, p - q + m)
        h_bot = h[:, p - q - 1 : p - q]
        producers = torch.cat([h_bot, h[:, p - q : p - q + m - 1]], 1)
        crop_cache(cache, p)
        for _ in range(iterations - 1):
            z = model.project(producers)
            h = _step(model, z, mask, cache, m)
            producers = torch.cat([h_bot, h[:, : m - 1]], 1)
            crop_cache(cache, p)
        return LatentState(cache, mask, model.project(producers), producers, p, m, iterations, suffix_emb)
    if scheme == "sequential":
        mask = prefix_mask
        h = _step(model, prefix_emb, mask, cache, p - q)
        producers = [h[:, -1:]]
        for _ in range(m - 1):
            z = model.project(producers[-1])
            mask = torch.cat([mask, prefix_mask.new_ones(b, 1)], 1)
            producers.append(_step(model, z, mask, cache, 1))
        prod = torch.cat(producers, 1)
        mask = torch.cat([mask, prefix_mask.new_ones(b, 1)], 1)
        return LatentState(cache, mask, model.project(prod[:, -1:]), prod, p, m, m, suffix_emb)
    raise ValueError(f"unknown latent scheme {scheme!r}")


def final_pass(
    model: KavaModel,
    state: LatentState,
    suffix_ids: torch.Tensor,
    suffix_mask: torch.Tensor,
    output_hidden_states: bool = False,
):
    """Feed the pending latents and the suffix (``<eot> ...``); returns the decoder output and
    the attention mask now covering everything. The cache then holds all latents. The suffix's
    embeddings are the state's when :func:`run_latents` made them (same ids), else made here."""
    k = state.pending.shape[1]
    suffix_emb = state.suffix_embeds
    if suffix_emb is None or suffix_emb.shape[1] != suffix_ids.shape[1]:
        suffix_emb = model.embed(suffix_ids)
    embeds = torch.cat([state.pending, suffix_emb], 1)
    mask = torch.cat([state.mask, suffix_mask], 1)
    out = model.run(embeds, mask, positions(mask)[:, -(k + suffix_ids.shape[1]) :], state.cache, output_hidden_states)
    state.passes += 1
    return out, mask, k


def cache_span(cache: DynamicCache, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of every layer at columns ``start:stop``: ``[L, B, H_kv, stop-start, d]``."""
    keys = torch.stack([layer.keys[:, :, start:stop] for layer in cache.layers])
    values = torch.stack([layer.values[:, :, start:stop] for layer in cache.layers])
    return keys, values

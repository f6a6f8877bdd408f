"""Gradient checkpointing (activations recomputed in the backward pass) that keeps the KV cache.

transformers drops the cache inside a checkpointed decoder layer (``use_cache=False``,
``cache=None``): a layer that appends to the cache would append again when the backward
pass recomputes it, and would read a cache that later passes have changed. Our latent
passes need that cache, so each decoder layer is checkpointed here instead, with
``torch.utils.checkpoint`` (non-reentrant) and a context that records, for the one cache
update the layer makes, the cache's past keys/values at forward time. The recompute then
returns ``cat(past, new)`` from that record and leaves the cache alone: the same tensors
as in the forward pass, so losses and gradients are those of the un-checkpointed model.
"""

from __future__ import annotations

import threading

import torch

_REPLAY = threading.local()


class _ReplayRecord:
    __slots__ = ("past",)

    def __init__(self):
        self.past = None


class _ReplayContext:
    def __init__(self, record: _ReplayRecord, replaying: bool):
        self.record, self.replaying = record, replaying

    def __enter__(self):
        self._prev = getattr(_REPLAY, "state", None)
        _REPLAY.state = (self.record, self.replaying)

    def __exit__(self, *exc):
        _REPLAY.state = self._prev


def _replay_contexts():
    record = _ReplayRecord()
    return _ReplayContext(record, False), _ReplayContext(record, True)


def _cache_class():
    from transformers import DynamicCache

    class ReplaySafeCache(DynamicCache):
        """A ``DynamicCache`` whose ``update`` is idempotent under checkpoint recomputation."""

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            state = getattr(_REPLAY, "state", None)
            if state is None:
                return super().update(key_states, value_states, layer_idx, *args, **kwargs)
            record, replaying = state
            if replaying:
                if record.past is None:
                    return key_states, value_states
                pk, pv = record.past
                return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)
            layers = getattr(self, "layers", [])
            layer = layers[layer_idx] if layer_idx < len(layers) else None
            keys = getattr(layer, "keys", None)
            record.past = None if keys is None or keys.numel() == 0 else (keys, layer.values)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return ReplaySafeCache


_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


def enable_checkpointing(layers) -> int:
    """Checkpoint every module in ``layers`` (the decoder layers), keeping the KV cache working.

    Active only in training mode with gradients enabled; evaluation runs the layers as they are.
    Returns the number of layers wrapped.
    """
    from torch.utils.checkpoint import checkpoint
    from transformers import DynamicCache

    safe_cls = _cache_class()
    n = 0
    for layer in layers:
        if getattr(layer, "_kava_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args, _inner=inner, _layer=layer, **kwargs):
            if not (_layer.training and torch.is_grad_enabled()):
                return _inner(*args, **kwargs)
            for name in _CACHE_NAMES:
                c = kwargs.get(name)
                if c is not None and type(c) is DynamicCache:
                    c.__class__ = safe_cls  # same state; only ``update`` differs (see above)
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=_replay_contexts, **kwargs)

        layer.forward = forward
        layer._kava_checkpointed = True
        n += 1
    return n

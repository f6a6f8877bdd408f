"""Offline teacher caches, read back: the compressed teacher KV targets and CODI hidden states
of every training example, extracted once by :func:`kava.distill.extract.extract`.

Layout of a cache folder::

    manifest.json              settings, model shape, data config, and every shard's source_ids
    shard-00000.safetensors    keys [n, L, H_kv, M, d], values, valid [n, L, H_kv, M], hidden [n, L, D]
    shard-00001.safetensors    ...

Shards are fixed slices of the training data (``shard_size`` examples each, in data order).
:class:`TeacherCache` reads targets back by ``source_id`` for training; the settings the
targets depend on are checked against the run's (one-line errors naming the field).
:class:`OfflineCache` is the target source that reads the run's own cache (``loss.teacher_cache``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ... import losses
from ...config import ConfigError, KavaConfig
from ..compression import Compressed, get_selector
from .base import Request, Target, TargetSource

MANIFEST = "manifest.json"
FORMAT = "kava-teacher-cache/2"  # 2: each example also keeps the KV normaliser's moments
TENSORS = ("keys", "values", "valid", "hidden", "moments")  # moments: kava.losses.kv_moments, per example


class TeacherCacheError(ConfigError):
    """A teacher cache that does not fit the run (or is incomplete); the message says why."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def model_shape(model) -> dict:
    """Layers, KV heads, head dim and width of ``model``'s decoder (from its config)."""
    c = model.base_model.config.get_text_config()
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {
        "num_layers": int(c.num_hidden_layers),
        "num_kv_heads": int(getattr(c, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "hidden_size": int(c.hidden_size),
    }


def settings(cfg: KavaConfig, model) -> dict:
    """What the targets depend on; checked when training reads the cache, and when a re-run
    of ``extract`` adds shards to an existing folder."""
    d = cfg.data
    return {
        "selector": cfg.loss.compression,
        "lam": cfg.loss.lam,
        "num_latents": cfg.latent.num_latents,
        "rope": cfg.loss.rope,
        "drop_last_step": cfg.loss.drop_last_step,
        "vocab_size": len(model.tokenizer),
        **model_shape(model),
        "text": {
            "question_template": d.question_template,
            "step_separator": d.step_separator,
            "answer_prefix": d.answer_prefix,
            "answer_template": d.answer_template,
            "use_chat_template": cfg.model.use_chat_template,
        },
    }


# Which config field each checked setting comes from (for one-line errors).
_FIELDS = {
    "num_latents": "latent.num_latents",
    "num_layers": "model (num_layers)",
    "num_kv_heads": "model (num_kv_heads)",
    "head_dim": "model (head_dim)",
    "hidden_size": "model (hidden_size)",
    "vocab_size": "model (tokenizer vocab size)",
    "selector": "loss.compression",
    "lam": "loss.lam",
    "rope": "loss.rope",
    "drop_last_step": "loss.drop_last_step",
    "text": "data (question/step/answer templates, model.use_chat_template)",
}


def compare_settings(expected: dict, recorded: dict, where: Path, skip: tuple[str, ...] = ()) -> None:
    for key, field in _FIELDS.items():
        if key in skip:
            continue
        if key not in recorded:
            raise TeacherCacheError(f"config field '{field}': the teacher cache at {where} does not record {key}")
        if recorded[key] != expected[key]:
            raise TeacherCacheError(
                f"config field '{field}': this run has {expected[key]!r} but the teacher cache at {where} was "
                f"extracted with {recorded[key]!r}"
            )


def check_config(cfg: KavaConfig) -> None:
    """Settings that offline caches cannot serve."""
    if cfg.curriculum.enabled:
        raise ConfigError(
            "config field 'curriculum.enabled': curriculum stages are not supported with offline teacher caches"
        )
    if cfg.loss.compression != "none" and not get_selector(cfg.loss.compression, cfg.loss.lam).cacheable:
        raise ConfigError(
            f"config field 'loss.compression': {cfg.loss.compression!r} makes its targets from more than the "
            "example's own teacher pass (the batch, a second pass or its token types) and cannot be cached"
        )


class TeacherCache:
    """Compressed targets and CODI hidden states by ``source_id``, read lazily from the shards."""

    def __init__(
        self, path: str | Path, cfg: KavaConfig, model, field: str = "loss.teacher_cache", other_model: bool = False
    ):
        """``other_model``: the cache of another teacher (``teachers.models[].cache``), whose
        shape and vocabulary may differ from the student's (``model``)."""
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise TeacherCacheError(f"config field '{field}': {file} does not exist (run `kava teacher extract` first)")
        check_config(cfg)
        try:
            self.manifest = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise TeacherCacheError(f"config field '{field}': {file} is not valid JSON ({e})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise TeacherCacheError(f"config field '{field}': {file} is not a {FORMAT} manifest")
        use_kv = cfg.loss.compression != "none" and cfg.loss.alpha_kv > 0
        # CODI hidden states do not depend on the selector; the KV targets do.
        skip = () if use_kv else ("selector", "lam", "rope", "num_latents")
        if other_model:
            skip += ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")
        compare_settings(settings(cfg, model), self.manifest.get("settings", {}), self.path, skip)
        self.where: dict[str, tuple[int, int]] = {}
        for i, s in enumerate(self.manifest["shards"]):
            for r, sid in enumerate(s["source_ids"]):
                self.where[sid] = (i, r)
        self._open: dict[int, object] = {}
        for i, shard in enumerate(self.manifest["shards"]):  # a damaged shard fails now, not mid-run
            if (self.path / shard["file"]).is_file():
                self._shard(i)

    @property
    def shape(self) -> dict:
        """The extracting model's ``num_layers``, ``num_kv_heads``, ``head_dim``, ``hidden_size``."""
        st = self.manifest["settings"]
        return {k: st[k] for k in ("num_layers", "num_kv_heads", "head_dim", "hidden_size")}

    def _shard(self, i: int):
        h = self._open.get(i)
        if h is None:
            from safetensors import safe_open

            file = self.path / self.manifest["shards"][i]["file"]
            from safetensors import SafetensorError

            if not file.is_file():
                raise TeacherCacheError(
                    f"teacher cache {self.path}: {file.name} is missing (run `kava teacher extract` again to finish it)"
                )
            try:
                h = self._open[i] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise TeacherCacheError(
                    f"teacher cache {self.path}: {file} is not a readable safetensors file, truncated or "
                    f"corrupted ({first}); delete it and run `kava teacher extract` again"
                ) from None
        return h

    def covers(self, source_ids: list[str]) -> bool:
        """Whether every one of ``source_ids`` has an entry."""
        return all(sid in self.where for sid in source_ids)

    def lookup(self, source_ids: list[str], device: torch.device | str = "cpu") -> Target:
        """``(Compressed [L, B, H_kv, M, ...], hidden [L, B, D])`` for ``source_ids``, in order."""
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in TENSORS}
        for sid in source_ids:
            if sid not in self.where:
                raise TeacherCacheError(
                    f"teacher cache {self.path}: no entry for source_id {sid!r} (extracted from other data?)"
                )
            i, r = self.where[sid]
            h = self._shard(i)
            for k in TENSORS:
                rows[k].append(h.get_slice(k)[r : r + 1])
        moments = torch.cat(rows.pop("moments")).sum(0)
        out = {k: torch.cat(v).transpose(0, 1).to(device) for k, v in rows.items()}
        scale = losses.scale_from_moments(moments).to(device)  # the normaliser the online pass would use
        return Target(Compressed(out["keys"], out["values"], out["valid"], None), out["hidden"], scale)


class OfflineCache(TargetSource):
    """Targets read from the run's offline teacher cache (``loss.teacher_cache``) by ``source_id``:
    the teacher pass runs only for its CE (``loss.teacher_ce > 0``), or not at all."""

    name = "cache"

    def __init__(self, model, cfg: KavaConfig):
        self.cache = TeacherCache(cfg.loss.teacher_cache, cfg, model)

    def covers(self, source_ids: list[str]) -> bool:
        return self.cache.covers(source_ids)

    def targets(self, request: Request) -> list[Target]:
        if request.source_ids is None:
            raise ValueError(
                "loss.teacher_cache is set but the batch carries no source_ids (build it with Objective.make_batch)"
            )
        return [self.cache.lookup(request.source_ids, request.device)]

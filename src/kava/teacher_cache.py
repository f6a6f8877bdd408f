"""Offline teacher caches: the compressed teacher KV targets, extracted once and read back.

``extract`` runs a frozen teacher (no grad, eval mode) over the training data and writes,
for every example, the ``M`` compressed KV slots of every layer and KV head (``keys`` /
``values`` ``[L, H_kv, M, d]``, ``valid`` ``[L, H_kv, M]``) and the teacher's hidden states
at the CODI position (``hidden`` ``[L, D]``), exactly as the online objective would compute
them (the same :meth:`kava.objective.Objective.teacher_targets`).

Layout of a cache folder::

    manifest.json              settings, model shape, data config, and every shard's source_ids
    shard-00000.safetensors    keys [n, L, H_kv, M, d], values, valid [n, L, H_kv, M], hidden [n, L, D]
    shard-00001.safetensors    ...

Shards are fixed slices of the training data (``shard_size`` examples each, in data order),
so any job computes the same plan: ``--shard I --num-shards K`` writes shards ``I, I+K, ...``
and a finished shard (its file exists; files appear atomically) is skipped on a re-run.
:class:`TeacherCache` reads targets back by ``source_id`` for training.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from .compression import Compressed
from .config import ConfigError, KavaConfig
from .io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "kava-teacher-cache/1"
TENSORS = ("keys", "values", "valid", "hidden")


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


def _compare(expected: dict, recorded: dict, where: Path, skip: tuple[str, ...] = ()) -> None:
    for key, field in _FIELDS.items():
        if key in skip:
            continue
        if key not in recorded:
            raise TeacherCacheError(f"config field '{field}': the teacher cache at {where} does not record {key}")
        if recorded[key] != expected[key]:
            raise TeacherCacheError(
                f"config field '{field}': this run has {expected[key]!r} but the teacher cache at {where} was extracted with {recorded[key]!r}"
            )


def check_config(cfg: KavaConfig) -> None:
    """Settings that offline caches cannot serve."""
    if cfg.curriculum.enabled:
        raise ConfigError("config field 'curriculum.enabled': curriculum stages are not supported with offline teacher caches")
    if cfg.loss.compression == "shuffled":
        raise ConfigError("config field 'loss.compression': 'shuffled' takes another example of the batch and cannot be cached")


# --- extraction ------------------------------------------------------------------------


def _plan(source_ids: list[str], shard_size: int) -> list[list[str]]:
    return [source_ids[i : i + shard_size] for i in range(0, len(source_ids), shard_size)]


def extract(
    cfg: KavaConfig,
    out: str | Path,
    *,
    shard_size: int = 1024,
    shard: int = 0,
    num_shards: int = 1,
    batch_size: int = 0,
    examples=None,
    model=None,
) -> dict:
    """Write the compressed teacher targets of the training data (or ``examples``) to ``out``.

    Only shards ``shard, shard + num_shards, ...`` are processed; shards already written are
    skipped. ``model`` defaults to :func:`kava.model.build_model` (``model.init_from``
    included). Returns ``{"written": [...], "skipped": [...], "num_shards": n, ...}``.
    """
    from safetensors.torch import save_file

    from .model.backbone import build_model
    from .objective import Objective
    from .data.sequences import TextEncoder, teacher_batch
    from .model.teacher import teacher_forward
    from .data.loaders import load_data

    check_config(cfg)
    if cfg.loss.compression == "none":
        raise ConfigError("config field 'loss.compression': 'none' has no KV targets to extract")
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"--shard {shard} --num-shards {num_shards}: need 0 <= shard < num_shards")
    out = Path(out)
    if examples is None:
        examples = load_data(cfg, "train")
    ids = [ex.source_id for ex in examples]
    if not ids:
        raise ConfigError("config field 'data.train': no training examples to extract")
    seen: set[str] = set()
    for sid in ids:
        if not sid:
            raise TeacherCacheError("every training example needs a source_id to be cached; one has none")
        if sid in seen:
            raise TeacherCacheError(f"source_id {sid!r} appears twice in the training data; cache keys must be unique")
        seen.add(sid)

    if model is None:
        model = build_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    was_training = model.training
    model.eval()
    # The objective's own target code, so the cache equals the online targets (its selector, RoPE option, generator).
    # (A copy that always has a selector and reads no cache: the cache is what we are writing.)
    cfg_kv = copy.deepcopy(cfg)
    cfg_kv.loss.alpha_kv = max(cfg_kv.loss.alpha_kv, 1.0)
    cfg_kv.loss.teacher_cache = ""
    objective = Objective(model, cfg_kv)
    m = cfg.latent.num_latents
    sel = objective.selector

    plan = _plan(ids, shard_size)
    st = settings(cfg, model)
    manifest = {
        "format": FORMAT,
        "settings": st,
        "model": {
            "name_or_path": cfg.model.name_or_path,
            "init_from": cfg.model.init_from,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "tokenizer": getattr(model.tokenizer, "name_or_path", "") or "",
        },
        "data": cfg.to_dict()["data"],
        "num_examples": len(ids),
        "shard_size": shard_size,
        "shards": [{"file": shard_name(i), "source_ids": s} for i, s in enumerate(plan)],
    }
    old_file = out / MANIFEST
    if old_file.is_file():
        old = json.loads(old_file.read_text())
        _compare(st, old.get("settings", {}), out)
        if old.get("shards") != manifest["shards"]:
            raise TeacherCacheError(f"{out}: holds a cache of other examples or another --shard-size; use a new --out folder")
    else:
        atomic_write_json(old_file, manifest)

    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    bs = batch_size or cfg.train.batch_size
    by_id = {ex.source_id: ex for ex in examples}
    written, skipped = [], []
    try:
        for i in range(shard, len(plan), num_shards):
            path = out / shard_name(i)
            if path.is_file():
                skipped.append(i)
                continue
            encs = [encoder.encode(by_id[sid]) for sid in plan[i]]
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in TENSORS}
            for j in range(0, len(encs), bs):
                tb = teacher_batch(encs[j : j + bs], objective.pad_id, with_cot=True, drop_last_step=cfg.loss.drop_last_step)
                tb = {k: v.to(device) for k, v in tb.items()}
                with torch.no_grad():
                    t = teacher_forward(model, tb, want_queries=sel.needs_queries, want_cache=True)
                    c = objective.teacher_targets(t, tb, None, m)
                parts["keys"].append(c.keys.transpose(0, 1).cpu())  # [b, L, H, M, d]
                parts["values"].append(c.values.transpose(0, 1).cpu())
                parts["valid"].append(c.valid.transpose(0, 1).cpu())
                parts["hidden"].append(t.hidden.transpose(0, 1).cpu())  # [b, L, D]
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            meta = {"format": FORMAT, "source_ids": json.dumps(plan[i])}
            atomic_write(path, lambda p, t=tensors, md=meta: save_file(t, str(p), metadata=md))
            written.append(i)
            log.info("teacher cache: wrote %s (%d examples)", path, len(plan[i]))
    finally:
        if was_training:
            model.train()
    return {"out": str(out), "num_shards": len(plan), "written": written, "skipped": skipped, "num_examples": len(ids)}


# --- reading ---------------------------------------------------------------------------


class TeacherCache:
    """Compressed targets and CODI hidden states by ``source_id``, read lazily from the shards."""

    def __init__(self, path: str | Path, cfg: KavaConfig, model, field: str = "loss.teacher_cache", other_model: bool = False):
        """``other_model``: the cache of another teacher (``teachers.models[].cache``), whose
        shape and vocabulary may differ from the student's (``model``)."""
        self.path = Path(path)
        file = self.path / MANIFEST
        if not file.is_file():
            raise TeacherCacheError(f"config field '{field}': {file} does not exist (run `kava teacher extract` first)")
        check_config(cfg)
        self.manifest = json.loads(file.read_text())
        if self.manifest.get("format") != FORMAT:
            raise TeacherCacheError(f"config field '{field}': {file} is not a {FORMAT} manifest")
        use_kv = cfg.loss.compression != "none" and cfg.loss.alpha_kv > 0
        # CODI hidden states do not depend on the selector; the KV targets do.
        skip = () if use_kv else ("selector", "lam", "rope", "num_latents")
        if other_model:
            skip += ("num_layers", "num_kv_heads", "head_dim", "hidden_size", "vocab_size")
        _compare(settings(cfg, model), self.manifest.get("settings", {}), self.path, skip)
        self.where: dict[str, tuple[int, int]] = {}
        for i, s in enumerate(self.manifest["shards"]):
            for r, sid in enumerate(s["source_ids"]):
                self.where[sid] = (i, r)
        self._open: dict[int, object] = {}

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
            if not file.is_file():
                raise TeacherCacheError(f"teacher cache {self.path}: {file.name} is missing (run `kava teacher extract` again to finish it)")
            h = self._open[i] = safe_open(str(file), framework="pt")
        return h

    def lookup(self, source_ids: list[str], device: torch.device | str = "cpu") -> tuple[Compressed, torch.Tensor]:
        """``(Compressed [L, B, H_kv, M, ...], hidden [L, B, D])`` for ``source_ids``, in order."""
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in TENSORS}
        for sid in source_ids:
            if sid not in self.where:
                raise TeacherCacheError(f"teacher cache {self.path}: no entry for source_id {sid!r} (extracted from other data?)")
            i, r = self.where[sid]
            h = self._shard(i)
            for k in TENSORS:
                rows[k].append(h.get_slice(k)[r : r + 1])
        out = {k: torch.cat(v).transpose(0, 1).to(device) for k, v in rows.items()}
        return Compressed(out["keys"], out["values"], out["valid"], None), out["hidden"]

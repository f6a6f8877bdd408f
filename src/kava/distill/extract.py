"""Offline teacher caches, written: run a frozen teacher once over the training data and store
its compressed KV targets and CODI hidden states (read back by :mod:`kava.distill.targets.cache`).

``extract`` runs the teacher (no grad, eval mode) over the training data and writes, for
every example, the ``M`` compressed KV slots of every layer and KV head (``keys`` /
``values`` ``[L, H_kv, M, d]``, ``valid`` ``[L, H_kv, M]``) and the teacher's hidden states
at the CODI position (``hidden`` ``[L, D]``), exactly as the online objective would compute
them (the objective's own :meth:`~kava.distill.objective.Objective.teacher_pass` and
:meth:`~kava.distill.objective.Objective.teacher_targets`).

Shards are fixed slices of the training data (``shard_size`` examples each, in data order),
so any job computes the same plan: ``--shard I --num-shards K`` writes shards ``I, I+K, ...``
and a finished shard (its file exists; files appear atomically) is skipped on a re-run.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from ..config import ConfigError, KavaConfig
from ..data.loaders import load_data
from ..data.sequences import TextEncoder, teacher_batch
from ..io import atomic_write, atomic_write_json
from ..model.checkpoints import build_model
from .objective import Objective
from .targets.cache import (
    FORMAT,
    MANIFEST,
    TENSORS,
    TeacherCacheError,
    check_config,
    compare_settings,
    settings,
    shard_name,
)

log = logging.getLogger("kava.teacher_cache")  # the name its log lines have always had


def _plan(source_ids: list[str], shard_size: int) -> list[list[str]]:
    return [source_ids[i : i + shard_size] for i in range(0, len(source_ids), shard_size)]


def _check_request(cfg: KavaConfig, shard_size: int, shard: int, num_shards: int, ids: list[str]) -> None:
    """Stop, naming the field or flag, where the extraction asked for cannot be made."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be >= 1, got {shard_size}")
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"--shard {shard} --num-shards {num_shards}: need 0 <= shard < num_shards")
    if not ids:
        raise ConfigError("config field 'data.train': no training examples to extract")
    seen: set[str] = set()
    for sid in ids:
        if not sid:
            raise TeacherCacheError("every training example needs a source_id to be cached; one has none")
        if sid in seen:
            raise TeacherCacheError(f"source_id {sid!r} appears twice in the training data; cache keys must be unique")
        seen.add(sid)


def _open_manifest(out: Path, cfg: KavaConfig, model, plan: list[list[str]], shard_size: int) -> None:
    """Write the cache's manifest, or check that the one ``out`` holds describes this cache."""
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
        "num_examples": sum(len(p) for p in plan),
        "shard_size": shard_size,
        "shards": [{"file": shard_name(i), "source_ids": s} for i, s in enumerate(plan)],
    }
    old_file = out / MANIFEST
    if not old_file.is_file():
        atomic_write_json(old_file, manifest)
        return
    old = json.loads(old_file.read_text())
    compare_settings(st, old.get("settings", {}), out)
    if old.get("shards") != manifest["shards"]:
        raise TeacherCacheError(
            f"{out}: holds a cache of other examples or another --shard-size; use a new --out folder"
        )


def _shard_tensors(objective: Objective, encs: list, cfg: KavaConfig, batch_size: int, device) -> dict:
    """One shard's targets, batch by batch, with the objective's own target code."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in TENSORS}
    for j in range(0, len(encs), batch_size):
        tb = teacher_batch(
            encs[j : j + batch_size], objective.pad_id, with_cot=True, drop_last_step=cfg.loss.drop_last_step
        )
        tb = {k: v.to(device) for k, v in tb.items()}
        with torch.no_grad():
            t = objective.teacher_pass(tb)
            c = objective.teacher_targets(t, tb, None, cfg.latent.num_latents)
        parts["keys"].append(c.keys.transpose(0, 1).cpu())  # [b, L, H, M, d]
        parts["values"].append(c.values.transpose(0, 1).cpu())
        parts["valid"].append(c.valid.transpose(0, 1).cpu())
        parts["hidden"].append(t.hidden.transpose(0, 1).cpu())  # [b, L, D]
        parts["moments"].append(objective.kv_moments(t, tb, None).cpu())  # [b, 2, L, 3]: the normaliser's sums
    return {k: torch.cat(v).contiguous() for k, v in parts.items()}


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

    check_config(cfg)  # before any data or model is loaded
    if cfg.loss.compression == "none":
        raise ConfigError("config field 'loss.compression': 'none' has no KV targets to extract")
    out = Path(out)
    if examples is None:
        examples = load_data(cfg, "train")
    ids = [ex.source_id for ex in examples]
    _check_request(cfg, shard_size, shard, num_shards, ids)
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
    plan = _plan(ids, shard_size)
    _open_manifest(out, cfg, model, plan, shard_size)
    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    by_id = {ex.source_id: ex for ex in examples}
    written, skipped = [], []
    try:
        for i in range(shard, len(plan), num_shards):
            path = out / shard_name(i)
            if path.is_file():
                skipped.append(i)
                continue
            encs = [encoder.encode(by_id[sid]) for sid in plan[i]]
            tensors = _shard_tensors(objective, encs, cfg, batch_size or cfg.train.batch_size, device)
            meta = {"format": FORMAT, "source_ids": json.dumps(plan[i])}
            atomic_write(path, lambda p, t=tensors, md=meta: save_file(t, str(p), metadata=md))
            written.append(i)
            log.info("teacher cache: wrote %s (%d examples)", path, len(plan[i]))
    finally:
        if was_training:
            model.train()
    return {"out": str(out), "num_shards": len(plan), "written": written, "skipped": skipped, "num_examples": len(ids)}

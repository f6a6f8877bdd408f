"""Offline teacher caches: extraction, equality with the online targets, resume, job arrays, errors."""

import json

import pytest
import torch
import yaml

from conftest import tiny_config
from kava.cli import build_parser
from kava.cli.teacher import register
from kava.config import ConfigError
from kava.data.schema import Example
from kava.data.sequences import TextEncoder
from kava.distill.extract import extract
from kava.distill.objective import Objective
from kava.distill.targets.cache import MANIFEST, TeacherCache, TeacherCacheError, shard_name
from kava.model import build_model
from kava.model.teacher import teacher_forward

EXAMPLES = [
    Example("7*2-7", ("<<7*2=4>>", "<<4-7=7>>"), "7", "a"),
    Example("3+4+1+2", ("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), "0", "b"),
    Example("5*5", ("<<5*5=5>>",), "5", "c"),
    Example("9-3-3", ("<<9-3=6>>", "<<6-3=3>>"), "3", "d"),
    Example("1+1", ("<<1+1=2>>",), "2", "e"),
]


def _cfg(**loss):
    return tiny_config(loss={"compression": "rkv", **loss})


@pytest.mark.parametrize("rope", ["post", "pre"])
def test_cached_targets_equal_online_targets(tmp_path, rope):
    cfg = _cfg(rope=rope)
    model = build_model(cfg)
    res = extract(cfg, tmp_path, shard_size=4, batch_size=4, examples=EXAMPLES[:4], model=model)
    assert res["written"] == [0] and res["num_examples"] == 4
    man = json.loads((tmp_path / MANIFEST).read_text())
    assert (
        man["settings"]["num_latents"] == 3 and man["settings"]["selector"] == "rkv" and man["settings"]["rope"] == rope
    )
    assert man["shards"][0]["source_ids"] == ["a", "b", "c", "d"]

    obj = Objective(model, cfg)
    encs = [TextEncoder(model.tokenizer, cfg.data).encode(e) for e in EXAMPLES[:4]]
    tb = obj.make_batch(encs)["teacher"]
    model.eval()
    with torch.no_grad():
        t = teacher_forward(model, tb, want_queries=True)
        online = obj.teacher_targets(t, tb, None, cfg.latent.num_latents)
    cached, hidden, scale = TeacherCache(tmp_path, cfg, model).lookup(["a", "b", "c", "d"])
    assert cached.keys.shape == online.keys.shape
    assert torch.equal(cached.valid, online.valid)
    v = online.valid[..., None]
    torch.testing.assert_close(cached.keys * v, online.keys * v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached.values * v, online.values * v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden, t.hidden, rtol=1e-6, atol=1e-6)
    # The batch normaliser rebuilt from each example's moments is the online one (whole CoT cache).
    torch.testing.assert_close(scale, obj.kv_scale(t, tb, None), rtol=1e-5, atol=1e-7)
    # Looked up in another order: the rows follow the source_ids.
    swapped, _, _ = TeacherCache(tmp_path, cfg, model).lookup(["c", "a"])
    torch.testing.assert_close(swapped.keys, cached.keys[:, [2, 0]])


@pytest.mark.parametrize("teacher_ce", [0.0, 1.0])
def test_training_loss_from_cache_equals_online(tmp_path, teacher_ce):
    cfg = _cfg(teacher_ce=teacher_ce)
    model = build_model(cfg)
    extract(cfg, tmp_path, shard_size=4, batch_size=4, examples=EXAMPLES[:4], model=model)
    model.train()
    online = Objective(model, cfg)
    cached_cfg = _cfg(teacher_ce=teacher_ce, teacher_cache=str(tmp_path))
    cached = Objective(model, cached_cfg)
    encs = [TextEncoder(model.tokenizer, cfg.data).encode(e) for e in EXAMPLES[:4]]
    batch = cached.make_batch(encs)
    assert batch["source_ids"] == ["a", "b", "c", "d"]  # the cache is looked up by them

    calls = []
    handle = model.decoder.register_forward_hook(lambda mod, args, kwargs, out: calls.append(1), with_kwargs=True)
    try:
        loss_c, m_c = cached(batch)
        n_cached = len(calls)
        calls.clear()
        loss_o, m_o = online(online.make_batch(encs))
        n_online = len(calls)
    finally:
        handle.remove()
    # teacher_ce == 0: the teacher does not run at all with a cache.
    assert n_online - n_cached == (1 if teacher_ce == 0 else 0)
    assert ("ce_teacher" in m_c) == (teacher_ce > 0)
    torch.testing.assert_close(loss_c, loss_o, rtol=1e-5, atol=1e-6)
    for k in ("kv", "codi", "ce_student"):
        assert float(m_c[k]) == pytest.approx(float(m_o[k]), rel=1e-5, abs=1e-6), k
    loss_c.backward()  # gradients reach the student through the cached targets' loss
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_resume_skips_finished_shards_and_job_arrays_cover_everything_once(tmp_path):
    cfg = _cfg()
    model = build_model(cfg)
    kw = dict(shard_size=2, batch_size=2, examples=EXAMPLES, model=model)
    # Three shards (2 + 2 + 1 examples) dealt over K=2 jobs: job 0 gets 0 and 2, job 1 gets 1.
    r0 = extract(cfg, tmp_path, shard=0, num_shards=2, **kw)
    assert r0["written"] == [0, 2] and r0["num_shards"] == 3
    assert not (tmp_path / shard_name(1)).exists()
    with pytest.raises(TeacherCacheError, match="shard-00001"):
        TeacherCache(tmp_path, cfg, model).lookup(["c"])
    mtime = (tmp_path / shard_name(0)).stat().st_mtime_ns
    r1 = extract(cfg, tmp_path, shard=1, num_shards=2, **kw)
    assert r1["written"] == [1]
    again = extract(cfg, tmp_path, **kw)
    assert again["written"] == [] and again["skipped"] == [0, 1, 2]
    assert (tmp_path / shard_name(0)).stat().st_mtime_ns == mtime

    from safetensors import safe_open

    seen = []
    for i in range(3):
        with safe_open(str(tmp_path / shard_name(i)), framework="pt") as f:
            seen += json.loads(f.metadata()["source_ids"])
            assert f.get_tensor("keys").shape[1:] == (2, 2, 3, 8)  # [n, L, H_kv, M, d]
            assert f.get_tensor("hidden").shape[1:] == (2, 32)
    assert sorted(seen) == ["a", "b", "c", "d", "e"]
    cache = TeacherCache(tmp_path, cfg, model)
    comp, hidden, _ = cache.lookup(["e", "a"])
    assert comp.keys.shape == (2, 2, 2, 3, 8) and hidden.shape == (2, 2, 32)
    with pytest.raises(TeacherCacheError, match="'zz'"):
        cache.lookup(["a", "zz"])


def test_mismatched_settings_are_one_line_errors(tmp_path):
    cfg = _cfg()
    model = build_model(cfg)
    extract(cfg, tmp_path, shard_size=4, examples=EXAMPLES[:4], model=model)
    other = tiny_config(latent={"num_latents": 4}, loss={"teacher_cache": str(tmp_path)})
    with pytest.raises(ConfigError, match="latent.num_latents") as e:
        Objective(model, other)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="loss.lam"):
        Objective(model, _cfg(lam=0.5, teacher_cache=str(tmp_path)))
    with pytest.raises(ConfigError, match="loss.compression"):
        Objective(model, _cfg(compression="last", teacher_cache=str(tmp_path)))
    # A re-run with other settings into the same folder is refused, too.
    with pytest.raises(ConfigError, match="latent.num_latents"):
        extract(tiny_config(latent={"num_latents": 4}), tmp_path, shard_size=4, examples=EXAMPLES[:4])
    with pytest.raises(ConfigError, match="curriculum.enabled"):
        tiny_config(curriculum={"enabled": True}, loss={"teacher_cache": str(tmp_path)})
    with pytest.raises(ConfigError, match="curriculum.enabled"):
        extract(tiny_config(curriculum={"enabled": True}), tmp_path / "x", examples=EXAMPLES[:4], model=model)
    with pytest.raises(ConfigError, match="does not exist"):
        Objective(model, _cfg(teacher_cache=str(tmp_path / "nowhere")))


def test_cli_extract_writes_the_manifest(tmp_path, capsys):
    import argparse

    # Until cli.py registers the group, build the parser here the same way.
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "teacher" not in sub.choices:
        register(sub)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg().to_dict()))
    out = tmp_path / "cache"
    argv = [
        "teacher",
        "extract",
        "--config",
        str(cfg_file),
        "--out",
        str(out),
        "--shard-size",
        "3",
        "data.train_limit=5",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    man = json.loads((out / MANIFEST).read_text())
    assert man["num_examples"] == 5 and len(man["shards"]) == 2
    assert man["model"]["name_or_path"] == "tiny" and man["data"]["train_limit"] == 5
    assert (out / shard_name(0)).is_file() and (out / shard_name(1)).is_file()
    assert "wrote 2" in capsys.readouterr().out


def test_train_from_cache_matches_online_first_step(tmp_path):
    from kava.training import train

    def run(name, **loss):
        cfg = tiny_config(
            loss={"teacher_ce": 0.0, **loss},
            data={"train_limit": 8},
            train={"output_dir": str(tmp_path / name), "max_steps": 2, "batch_size": 4},
        )
        return cfg, train(cfg)

    cfg, online = run("online")
    extract(cfg, tmp_path / "cache", shard_size=4)
    _, cached = run("cached", teacher_cache=str(tmp_path / "cache"))
    first = lambda r: json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[0])  # noqa: E731
    assert first("cached")["loss"] == pytest.approx(first("online")["loss"], rel=1e-5)
    assert cached["step"] == 2 and "ce_teacher" not in first("cached")

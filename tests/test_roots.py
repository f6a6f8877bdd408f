"""Roots of outputs and caches: the config wins over the environment, the environment over defaults."""

from pathlib import Path

import pytest

from conftest import tiny_config
from kava.config import under_output_root
from kava.data import load_data
from kava.model.files import ModelLoadError


def test_output_root_config_then_environment_then_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("KAVA_OUTPUT_ROOT", raising=False)
    assert under_output_root("runs/a") == Path("runs/a")
    monkeypatch.setenv("KAVA_OUTPUT_ROOT", str(tmp_path / "scratch"))
    assert under_output_root("runs/a") == tmp_path / "scratch" / "runs/a"
    assert under_output_root("runs/a", str(tmp_path / "cfg")) == tmp_path / "cfg" / "runs/a"  # the config wins
    assert under_output_root(tmp_path / "abs") == tmp_path / "abs"  # an absolute output_dir is kept


def test_a_run_goes_under_kava_output_root(tmp_path, monkeypatch):
    from kava.training import train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAVA_OUTPUT_ROOT", str(tmp_path / "scratch"))
    cfg = tiny_config(train={"output_dir": "runs/r", "max_steps": 1})
    train(cfg)
    run = tmp_path / "scratch" / "runs" / "r"
    assert (run / "checkpoint-1").is_dir() and not (tmp_path / "runs").exists()
    assert f"output_dir: {run}" in (run / "config.yaml").read_text()  # the saved config says where it went


def test_model_cache_dir_reaches_from_pretrained(monkeypatch):
    import transformers

    from kava.model.backbone import load_backbone

    seen = {}

    def fake(path, **kw):
        seen.update(kw)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    monkeypatch.setattr("kava.io._probe", lambda *a: None)  # a hub that answers (this machine may have no network)
    cfg = tiny_config(model={"name_or_path": "org/model", "cache_dir": "/scratch/hf"})
    with pytest.raises(ModelLoadError, match="org/model"):
        load_backbone(cfg.model)
    assert seen["cache_dir"] == "/scratch/hf"
    seen.clear()
    with pytest.raises(ModelLoadError):
        load_backbone(tiny_config(model={"name_or_path": "org/model"}).model)
    assert "cache_dir" not in seen  # unset: Hugging Face's own ($HF_HUB_CACHE, $HF_HOME)


def test_data_cache_dir_reaches_load_dataset(monkeypatch):
    import datasets

    seen = {}

    def fake(hub_id, config=None, split=None, streaming=False, cache_dir=None):
        seen.update(hub_id=hub_id, cache_dir=cache_dir)
        return [{"question": "Q?", "answer": "#### 3"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr("kava.io._probe", lambda *a: None)  # a hub that answers (this machine may have no network)
    cfg = tiny_config(data={"eval": "gsm8k", "cache_dir": "/scratch/datasets"})
    assert [e.answer for e in load_data(cfg, "eval")] == ["3"]
    assert seen == {"hub_id": "openai/gsm8k", "cache_dir": "/scratch/datasets"}
    load_data(tiny_config(data={"eval": "gsm8k"}), "eval")
    assert seen["cache_dir"] is None


def test_sweep_output_dir_goes_under_kava_output_root(tmp_path, monkeypatch):
    from kava.experiments.sweep import expand_sweep

    (tmp_path / "base.yaml").write_text("train:\n  max_steps: 1\n")
    (tmp_path / "s.yaml").write_text(
        "base_config: base.yaml\noutput_dir: runs/abl\nseeds: [0]\ngrid:\n  train.lr: [0.001]\n"
    )
    monkeypatch.setenv("KAVA_OUTPUT_ROOT", str(tmp_path / "scratch"))
    [spec] = expand_sweep(tmp_path / "s.yaml")
    assert spec.output_dir.is_relative_to(tmp_path / "scratch" / "runs" / "abl")

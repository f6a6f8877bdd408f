"""Trackers (train.report_to), the start-of-run summary and the metrics rows."""

import json
import sys
from datetime import datetime

import pytest

from conftest import tiny_config
from kava.cli import main
from kava.config import ConfigError
from kava.training import train
from kava.training.tracking import flat_config, tracker_names


def _cfg(tmp_path, **train_kw):
    return tiny_config(
        train={"output_dir": str(tmp_path / "run"), "max_steps": 4, "log_every": 2, **train_kw},
        curriculum={"enabled": True, "steps_per_stage": 1, "max_stage": 2},
    )


def test_metrics_rows_summary_and_integer_stage(tmp_path):
    cfg = _cfg(tmp_path)
    train(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["examples"] == 64 and summary["max_steps"] == 4 and summary["effective_batch"] == 4
    assert summary["device"] == "cpu" and summary["mixed_precision"] == "no" and summary["weights_dtype"] == "float32"
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    assert summary["trainable_parameters"] == summary["total_parameters"]  # full fine-tuning of a model built in code
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        datetime.fromisoformat(r["time"])
        assert r["examples_per_s"] > 0 and r["tokens_per_s"] > r["examples_per_s"] and r["peak_mem_gib"] > 0
        assert isinstance(r["stage"], int)
    assert rows[0]["lr"] > rows[1]["lr"] == 0.0  # cosine to 0 at the last step
    # Steps 0,1 are stages 1,2 and steps 2,3 stage 2 (max_stage): the row of steps 0-1 says 2, not 1.5.
    assert [r["stage"] for r in rows] == [2, 2]


def test_missing_tracker_package_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ConfigError, match=r"train.report_to.*wandb.*pip install wandb"):
        tracker_names(_cfg(tmp_path, report_to="wandb"))
    assert main(["train", "train.report_to=wandb", f"train.output_dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kava: error:") and "pip install wandb" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before any folder or model was made


def test_report_to_names_and_validation(tmp_path):
    assert tracker_names(_cfg(tmp_path)) == []
    assert tracker_names(_cfg(tmp_path, report_to="none")) == []
    with pytest.raises(ConfigError, match="train.report_to"):
        _cfg(tmp_path, report_to="tensorbord")
    flat = flat_config(_cfg(tmp_path))
    assert flat["train.lr"] == 1e-3 and flat["latent.num_latents"] == 3 and isinstance(flat["eval.modes"], str)


def test_tensorboard_and_wandb_offline_write_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _cfg(tmp_path, report_to="tensorboard,wandb", project="proj")
    assert tracker_names(cfg) == ["tensorboard", "wandb"]
    train(cfg)
    run = tmp_path / "run"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs" / "proj"))
    events.Reload()
    assert {"loss", "lr", "examples_per_s", "stage"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))
    assert json.loads((run / "run_summary.json").read_text())["report_to"] == ["tensorboard", "wandb"]

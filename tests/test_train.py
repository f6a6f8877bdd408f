"""The training loop end to end on a tiny model: resume, checkpoints, signals, bad input."""

import json
import os
import signal

import pytest
import torch

from conftest import tiny_config
from kava.cli import main
from kava.data import load_data
from kava.evaluation import evaluate
from kava.model import checkpoint_layout, checkpoint_tensors, load_checkpoint
from kava.training import TrainingError, train


def _cfg(tmp_path, name, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"output_dir": str(tmp_path / name), **sections["train"]}
    return tiny_config(**sections)


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_resume_continues_exactly(tmp_path, adapter):
    """N steps, then resume for N more, gives the same weights as 2N steps in one go."""
    common = dict(
        model={"adapter": adapter, "lora_r": 4, "lora_dropout": 0.1},
        latent={"projection_dropout": 0.1},
        loss={"compression": "random"},
    )
    full = _cfg(tmp_path, "full", train={"max_steps": 6, "save_every": 3}, **common)
    train(full)
    half = _cfg(tmp_path, "half", train={"max_steps": 6, "save_every": 3}, **common)
    # Stop after step 3 as a pre-empted job would (SIGTERM), then resume.
    res = _train_until(half, 3)
    assert res["state"] == "interrupted" and res["step"] == 3
    res2 = train(half, resume=True)
    assert res2["state"] == "finished" and res2["step"] == 6
    a = checkpoint_tensors(tmp_path / "full" / "checkpoint-6")
    b = checkpoint_tensors(tmp_path / "half" / "checkpoint-6")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _train_until(cfg, step):
    """Train, sending ourselves SIGTERM once ``step`` optimizer steps are done."""
    import kava.training as kt

    sched_step = torch.optim.lr_scheduler.LRScheduler.step
    count = {"n": 0}

    def step_and_signal(self, *a, **kw):
        out = sched_step(self, *a, **kw)
        count["n"] += 1
        if count["n"] == step + 1:  # the first call happens at construction
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    torch.optim.lr_scheduler.LRScheduler.step = step_and_signal
    try:
        return kt.train(cfg)
    finally:
        torch.optim.lr_scheduler.LRScheduler.step = sched_step


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    cfg = _cfg(tmp_path, "sig", train={"max_steps": 50})
    res = _train_until(cfg, 2)
    assert res["state"] == "interrupted" and res["step"] == 2
    assert checkpoint_layout(tmp_path / "sig" / "checkpoint-2") == "full"
    status = json.loads((tmp_path / "sig" / "status.json").read_text())
    assert status["state"] == "interrupted"


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    cfg = _cfg(tmp_path, "nan", train={"lr": 1e30, "max_steps": 30, "grad_clip": 0.0})
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(cfg)


def test_metrics_config_and_reloaded_student_gives_same_answers(tmp_path):
    cfg = _cfg(tmp_path, "run", train={"max_steps": 3, "eval_at_end": True})
    res = train(cfg)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"ce_student", "ce_teacher", "codi", "kv", "kv_cos", "lr"} <= rows[0].keys()
    grid = json.loads((run / "kv_cosine.json").read_text())  # for `kava report`'s heatmap
    assert len(grid) == cfg.model.tiny.num_layers and len(grid[0]) == cfg.latent.num_latents
    assert "student" in res["eval"] and (run / "predictions_student.jsonl").is_file()
    model = load_checkpoint(run / "checkpoint-3")
    again = evaluate(model, load_data(cfg, "eval"), cfg, ["student"], tmp_path / "again")
    first = [json.loads(line)["prediction"] for line in (run / "predictions_student.jsonl").read_text().splitlines()]
    second = [
        json.loads(line)["prediction"]
        for line in (tmp_path / "again" / "predictions_student.jsonl").read_text().splitlines()
    ]
    assert first == second
    assert again["student"]["accuracy"] == res["eval"]["student"]["accuracy"]


@pytest.mark.parametrize("mode", ["cot", "nocot"])
def test_baseline_modes_train_and_evaluate(tmp_path, mode):
    cfg = _cfg(tmp_path, mode, train={"mode": mode, "max_steps": 2, "eval_at_end": True})
    res = train(cfg)
    assert list(res["eval"]) == [mode]
    r = res["eval"][mode]
    assert r["n"] == 16 and r["forward_passes"] >= 1 and r["kv_cache_bytes"] > 0
    assert not (tmp_path / mode / "kv_cosine.json").exists()


def test_accumulation_matches_one_big_batch(tmp_path):
    """batch 2 x 2 accumulation steps == batch 4 in one go (same examples, same update)."""
    # Batch statistics (CODI's and the KV loss's per-batch std) would differ: switch them off.
    loss = {"compression": "rkv", "alpha_codi": 0.0, "layer_std": False}
    a = _cfg(tmp_path, "a", train={"batch_size": 4, "effective_batch": 4, "max_steps": 2}, loss=loss)
    b = _cfg(tmp_path, "b", train={"batch_size": 2, "effective_batch": 4, "max_steps": 2}, loss=loss)
    train(a)
    train(b)
    wa = checkpoint_tensors(tmp_path / "a" / "checkpoint-2")
    wb = checkpoint_tensors(tmp_path / "b" / "checkpoint-2")
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    # The same update up to float rounding.
    assert diff < 2e-4


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.yaml" in err[0]
    assert main(["train", "train.lrr=1"]) == 2
    assert "train.lrr" in capsys.readouterr().err


def test_cli_missing_checkpoint_and_model(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "no kava checkpoint" in capsys.readouterr().err
    assert main(["train", f"train.output_dir={tmp_path / 'm'}", f"model.name_or_path={tmp_path / 'missing.gguf'}"]) == 1
    assert "missing.gguf" in capsys.readouterr().err


def test_shuffled_control_trains_to_the_end_and_is_evaluated(tmp_path):
    """The end-of-run KV-cosine probe used to raise for the shuffled control (a batch of one)."""
    cfg = _cfg(tmp_path, "shuf", train={"max_steps": 2, "eval_at_end": True}, loss={"compression": "shuffled"})
    res = train(cfg)
    assert res["state"] == "finished" and "student" in res["eval"]
    status = json.loads((tmp_path / "shuf" / "status.json").read_text())
    assert status["state"] == "finished" and status["eval"]["student"]["n"] == 16
    grid = json.loads((tmp_path / "shuf" / "kv_cosine.json").read_text())
    assert len(grid) == cfg.model.tiny.num_layers


def test_init_from_another_architecture_is_a_one_line_error(tmp_path, capsys):
    base = _cfg(tmp_path, "base", train={"mode": "cot", "max_steps": 1})
    train(base)
    ckpt = tmp_path / "base" / "checkpoint-1"
    # The run's config describes a wider model than the checkpoint holds.
    code = main(
        [
            "train",
            f"train.output_dir={tmp_path / 'student'}",
            f"model.init_from={ckpt}",
            "model.tiny.hidden_size=64",
            "model.tiny.num_layers=2",
            "model.tiny.num_heads=4",
            "model.tiny.num_kv_heads=2",
            "model.tiny.intermediate_size=64",
            "train.max_steps=1",
            "train.progress=false",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "model.tiny.hidden_size=32" in err[0] and str(ckpt) in err[0]
    assert not (tmp_path / "student" / "config.yaml").exists()  # nothing recorded for a run that did not start
    # The same architecture starts from the checkpoint and records what it trains.
    same = _cfg(tmp_path, "student2", model={"init_from": str(ckpt)}, train={"max_steps": 1})
    assert train(same)["state"] == "finished"


def test_teacher_mode_trains_and_is_evaluated_in_cot_mode(tmp_path):
    cfg = _cfg(tmp_path, "teacher", train={"mode": "teacher", "max_steps": 2, "eval_at_end": True})
    res = train(cfg)
    assert list(res["eval"]) == ["cot"] and res["eval"]["cot"]["n"] == 16
    assert not (tmp_path / "teacher" / "kv_cosine.json").exists()


def test_fused_adamw_makes_the_for_loop_updates_to_rounding(tmp_path):
    """train.fused_optimizer: the fused kernel is used on this CPU, and four steps end at the
    for-loop AdamW's weights to float rounding."""
    from kava.training.loop import set_up

    weights = {}
    for fused in (True, False):
        cfg = _cfg(tmp_path, f"fused-{fused}", train={"max_steps": 4, "save_every": 2, "fused_optimizer": fused})
        run = set_up(cfg)
        assert bool(run.optimizer.optimizer.param_groups[0]["fused"]) is fused
        train(cfg)
        for step in (2, 4):
            weights[fused, step] = checkpoint_tensors(tmp_path / f"fused-{fused}" / f"checkpoint-{step}")
    for step in (2, 4):
        assert weights[True, step].keys() == weights[False, step].keys()
        for k, v in weights[False, step].items():
            torch.testing.assert_close(weights[True, step][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # The steps between the two checkpoints did move the weights.
    assert any(not torch.equal(v, weights[False, 2][k]) for k, v in weights[False, 4].items())


def test_fused_adamw_falls_back_where_torch_has_no_kernel(caplog):
    from kava.training.optim import fused_unsupported, make_optimizer

    p = torch.nn.Parameter(torch.randn(3, 3))
    assert fused_unsupported([p]) is None
    assert make_optimizer([{"params": [p]}], 1e-3, 0.0).param_groups[0]["fused"] is True
    meta = torch.nn.Parameter(torch.randn(3, 3, device="meta"))
    assert "meta" in fused_unsupported([p, meta])
    with caplog.at_level("INFO", logger="kava.train"):
        opt = make_optimizer([{"params": [meta]}], 1e-3, 0.0)
    assert not opt.param_groups[0]["fused"] and "for-loop AdamW" in caplog.text
    assert not make_optimizer([{"params": [p]}], 1e-3, 0.0, fused=False).param_groups[0]["fused"]


def test_init_from_a_run_folder_starts_from_its_latest_checkpoint_and_records_it(tmp_path, capsys):
    base = _cfg(tmp_path, "base", train={"mode": "cot", "max_steps": 2, "save_every": 1})
    train(base)
    student = _cfg(tmp_path, "student", model={"init_from": str(tmp_path / "base")}, train={"max_steps": 1})
    assert train(student)["state"] == "finished"
    import yaml

    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved["model"]["init_from"] == str(tmp_path / "base" / "checkpoint-2")
    # Resuming with the run folder again is the same run (it resolves to the recorded checkpoint).
    assert (
        train(
            _cfg(tmp_path, "student", model={"init_from": str(tmp_path / "base")}, train={"max_steps": 1}), resume=True
        )["state"]
        == "finished"
    )
    # A missing folder, and one with no checkpoint, are reported as such.
    (tmp_path / "empty").mkdir()
    for where, says in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "empty", "holds no kava checkpoint")):
        code = main(
            ["train", f"train.output_dir={tmp_path / 'other'}", f"model.init_from={where}", "train.max_steps=1"]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and len(err) == 1 and says in err[0] and str(where) in err[0], err


@pytest.mark.parametrize(
    "config,checkpoint",
    [
        ("configs/tiny/teacher.yaml", "runs/tiny/cot/checkpoint-600"),
        ("configs/tiny/kava.yaml", "runs/tiny/teacher/checkpoint-400"),
        ("configs/curriculum/kava.yaml", "runs/curriculum/cot/checkpoint-500"),
    ],
)
def test_the_shipped_configs_resolve_to_the_checkpoints_they_named(tmp_path, monkeypatch, config, checkpoint):
    """The run folders the configs name resolve to the checkpoint their base run writes (its last)."""
    from pathlib import Path

    from kava.config import load_config
    from kava.model import resolve_init_from
    from kava.model.checkpoints import CONFIG_FILE, STATE_JSON

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / config)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / checkpoint
    ckpt.mkdir(parents=True)
    (ckpt / CONFIG_FILE).write_text("{}")
    (ckpt / STATE_JSON).write_text("{}")
    assert resolve_init_from(cfg.model.init_from) == checkpoint

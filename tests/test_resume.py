"""``kava train --resume`` through the command: the run's own config, exact continuation, refusals."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_config
from kava.cli import main
from kava.model import checkpoint_tensors


def _config(tmp_path: Path, name: str, **train) -> Path:
    cfg = tiny_config(
        model={"adapter": "lora", "lora_r": 4, "lora_dropout": 0.1},
        latent={"projection_dropout": 0.1},
        loss={"compression": "random"},
        train={"output_dir": str(tmp_path / name), "max_steps": 6, **train},
    ).to_dict()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kava(*argv) -> int:
    return main([str(a) for a in argv])


def _kava_until(step: int, *argv) -> int:
    """The command, sent SIGTERM once ``step`` optimizer steps are done (a pre-empted job)."""
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
        return _kava(*argv)
    finally:
        torch.optim.lr_scheduler.LRScheduler.step = sched_step


def _same_weights(a: Path, b: Path) -> None:
    ta, tb = checkpoint_tensors(a), checkpoint_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".kava.lock"
    }


def test_a_plain_resume_rereads_the_runs_overrides_and_continues_exactly(tmp_path):
    """Started with overrides and pre-empted at step 3 of 6 (cosine), ``--resume`` without them
    finishes with the run's own config: the same weights as 6 steps in one go."""
    assert _kava("train", "--config", _config(tmp_path, "straight"), "train.seed=1", "train.lr=2e-3") == 0
    split = _config(tmp_path, "split")
    assert _kava_until(3, "train", "--config", split, "train.seed=1", "train.lr=2e-3") == 128 + signal.SIGTERM
    assert _kava("train", "--config", split, "--resume") == 0
    saved = yaml.safe_load((tmp_path / "split" / "config.yaml").read_text())
    assert saved["train"]["seed"] == 1 and saved["train"]["lr"] == 2e-3
    _same_weights(tmp_path / "straight" / "checkpoint-6", tmp_path / "split" / "checkpoint-6")


def test_max_steps_may_grow_under_a_constant_schedule_with_overrides_after_the_flags(tmp_path):
    """3 steps, then ``--resume train.max_steps=6`` (an override after the flags) == 6 in one go."""
    assert _kava("train", "--config", _config(tmp_path, "straight", lr_schedule="constant")) == 0
    split = _config(tmp_path, "split", lr_schedule="constant", max_steps=3)
    assert _kava("train", "--config", split) == 0
    assert _kava("train", "--config", split, "--resume", "train.max_steps=6", "train.log_every=2") == 0
    _same_weights(tmp_path / "straight" / "checkpoint-6", tmp_path / "split" / "checkpoint-6")


def test_max_steps_may_grow_under_a_warmup_ratio_that_gives_as_many_warmup_steps(tmp_path, capsys):
    """A constant schedule with ``train.warmup_ratio`` (as configs/smollm2/ has): 3 steps and a
    resume to 6 keep int(0.1 * N) = 0 warm-up steps, so the resume is exact and allowed; a ratio
    whose warm-up would grow is refused with the reason."""
    assert _kava("train", "--config", _config(tmp_path, "straight", lr_schedule="constant", warmup_ratio=0.1)) == 0
    split = _config(tmp_path, "split", lr_schedule="constant", warmup_ratio=0.1, max_steps=3)
    assert _kava("train", "--config", split) == 0
    assert _kava("train", "--config", split, "--resume", "train.max_steps=6") == 0
    _same_weights(tmp_path / "straight" / "checkpoint-6", tmp_path / "split" / "checkpoint-6")
    capsys.readouterr()
    grows = _config(tmp_path, "grows", lr_schedule="constant", warmup_ratio=0.5, max_steps=2)
    assert _kava("train", "--config", grows) == 0
    assert _kava("train", "--config", grows, "--resume", "train.max_steps=4") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train.max_steps: 2 -> 4 (the warm-up" in err and "1 -> 2 steps" in err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    assert _kava("train", "--config", _config(root, "run", max_steps=2)) == 0
    return root


@pytest.mark.parametrize(
    "override,field",
    [
        ("train.max_steps=4", "train.max_steps"),  # a cosine schedule: its length changes every step's lr
        ("train.seed=3", "train.seed"),
        ("train.lr=0.01", "train.lr"),
        ("train.batch_size=2", "train.batch_size"),
        ("data.synthetic_train_size=32", "data.synthetic_train_size"),
        ("loss.compression=rkv", "loss.compression"),
    ],
)
def test_a_resume_that_changes_the_result_is_refused_by_name(finished, override, field, capsys):
    before = _snapshot(finished / "run")
    assert _kava("train", "--config", finished / "run.yaml", "--resume", override) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1 and field in err and "--resume" in err
    assert _snapshot(finished / "run") == before


def test_an_edited_config_file_does_not_change_a_resumed_run(finished, capsys):
    """The run's config.yaml is what a resume continues with, not the (since edited) file."""
    edited = yaml.safe_load((finished / "run.yaml").read_text())
    edited["train"]["lr"] = 0.5
    path = finished / "edited.yaml"
    path.write_text(yaml.safe_dump(edited))
    before = _snapshot(finished / "run")
    assert _kava("train", "--config", path, "--resume", "train.log_every=3") == 0
    assert yaml.safe_load((finished / "run" / "config.yaml").read_text())["train"]["lr"] == 1e-3
    weights = lambda snap: {k: v for k, v in snap.items() if k.endswith("model.safetensors")}  # noqa: E731
    assert weights(_snapshot(finished / "run")) == weights(before) != {}


def test_an_unknown_argument_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        _kava("train", "--config", "x.yaml", "--bogus", "train.lr=1")
    assert "unrecognized arguments: --bogus\n" in capsys.readouterr().err

"""A reader that went away (``kava ... | head``) never stops a command or fails a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import tiny_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
REPO = Path(__file__).resolve().parents[1]


def _into_a_closed_pipe(*argv: str, cwd: Path) -> int:
    """Run ``kava ARGV`` with stdout and stderr on a pipe whose reader is already gone."""
    r, w = os.pipe()
    os.close(r)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    try:
        return subprocess.run(
            [sys.executable, "-m", "kava.cli", *argv], stdout=w, stderr=w, env=env, cwd=cwd, timeout=600
        ).returncode
    finally:
        os.close(w)


def test_config_show_into_a_closed_pipe_exits_cleanly(tmp_path):
    assert _into_a_closed_pipe("config", "--show", str(REPO / "configs" / "tiny" / "kava.yaml"), cwd=tmp_path) == 0


def test_a_training_run_into_a_closed_pipe_finishes(tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path / "run"), "max_steps": 2, "progress": True, "log_every": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert _into_a_closed_pipe("train", "--config", str(tmp_path / "c.yaml"), cwd=tmp_path) == 0
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 2

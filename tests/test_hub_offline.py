"""An unreachable hub dataset: one line naming it and what to do, a status.json, a folder a new start may reuse."""

from __future__ import annotations

import json

import yaml

from conftest import tiny_config
from kava.cli import main


def test_an_unreachable_hub_dataset_is_one_line_and_the_failed_start_says_so(tmp_path, monkeypatch, capsys):
    import datasets

    def offline(*a, **kw):  # what datasets raises offline (HF_HUB_OFFLINE=1) or without a network
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(data={"train": "gsm8k"}, train={"output_dir": str(run)}).to_dict()))
    assert main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openai/gsm8k" in err[0] and "HF_HUB_OFFLINE" in err[0] and "local" in err[0], err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "openai/gsm8k" in status["error"]
    # The folder holds only that status: a new start (with local data) is not refused as "not empty".
    assert main(["train", "--config", str(cfg), "data.train=synthetic", "train.max_steps=1"]) == 0
    assert json.loads((run / "status.json").read_text())["state"] == "finished"

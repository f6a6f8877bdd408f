"""An unreachable hub dataset: one line naming it and what to do, a status.json, a folder a new start may reuse."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
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


# --- no network: one line at once, not half a minute of retries ---------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """A hub endpoint nothing listens on (connection refused at once), offline mode off."""
    from kava import io

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    io._probe.cache_clear()
    yield
    io._probe.cache_clear()


def test_hub_unreachable_says_why_and_offline_mode_never_probes(no_hub, monkeypatch):
    from kava.io import hub_offline, hub_unreachable

    reason = hub_unreachable(timeout=1.0)
    assert reason is not None and reason.startswith("127.0.0.1 cannot be reached")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline() and hub_unreachable() is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub_offline()


def test_an_unreachable_hub_fails_a_dataset_at_once_without_asking_datasets(no_hub, monkeypatch, tmp_path, capsys):
    import datasets

    def never(*a, **kw):  # the retries live in there
        raise AssertionError("load_dataset was called although the hub cannot be reached")

    monkeypatch.setattr(datasets, "load_dataset", never)
    started = time.monotonic()
    assert main(["eval", "--model", "tiny", "--data", "gsm8k", "--out", str(tmp_path / "e")]) == 1
    assert time.monotonic() - started < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "openai/gsm8k" in err[0] and "cannot be reached" in err[0], err
    assert "HF_HUB_OFFLINE=1" in err[0] and "local .jsonl" in err[0]


def test_an_unreachable_hub_model_fails_at_once_or_loads_from_the_cache(no_hub, tmp_path):
    from kava.config import ModelConfig
    from kava.model.backbone import load_backbone
    from kava.model.files import ModelLoadError
    from test_real_models import _save_hf_folder, _tokenizer

    cache = tmp_path / "hub"
    with pytest.raises(ModelLoadError, match=r"'someone/model'.*nor in the Hugging Face cache.*cannot be reached"):
        load_backbone(ModelConfig(name_or_path="someone/model", cache_dir=str(cache)))
    # The same id, cached as huggingface_hub lays out its cache: loaded with local_files_only, no network.
    snapshot = cache / "models--someone--model" / "snapshots" / ("0" * 40)
    tok = _tokenizer(add_bos=True, pad=None)
    _save_hf_folder(snapshot, tok)
    (cache / "models--someone--model" / "refs").mkdir()
    (cache / "models--someone--model" / "refs" / "main").write_text("0" * 40)
    got_tok, model = load_backbone(ModelConfig(name_or_path="someone/model", cache_dir=str(cache)))
    assert len(got_tok) == len(tok) and model.config.num_hidden_layers == 2


def test_hub_libraries_log_each_line_once():
    code = (
        "import logging; from kava.logs import setup_logging; setup_logging(False); "
        "import datasets, huggingface_hub; "  # each installs a handler of its own
        "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].'); "
        "logging.getLogger('datasets.load').warning('Using the latest cached version')"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("Retrying in 1s") == 1 and err.count("latest cached version") == 1, err


# --- a run whose process died leaves its lock file, not its lock -----------------------------------


def test_the_lock_of_a_killed_run_is_free_for_the_next(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from kava.training.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        from kava.training.rundir import LOCK_FILE, RunFolderError, RunLock

        with pytest.raises(RunFolderError, match=f"in use by another run.*{holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # the file stays; the kernel freed its lock with the process
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()

"""Adversarial inputs through the ``kava`` command, and faults during a run.

Each bad input is one row: the command, its expected exit code and what the one-line error
must name. Every row asserts a non-zero exit, exactly one ``error:`` line naming the field or
file, no traceback, and that a finished run folder the command was pointed at is unchanged
(nothing already written is lost). Almost every row fails before any model is built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from kava.cli import main
from kava.model.checkpoints import STATE_TENSORS, WEIGHTS_FILE
from kava.training import TrainingError, train
from kava.training.rundir import LOCK_FILE, RunLock

SRC = str(Path(__file__).resolve().parents[1] / "src")


# --- fixtures -------------------------------------------------------------------------


def _tiny_dict(out: Path, **train) -> dict:
    cfg = tiny_config(train={"output_dir": str(out), "max_steps": 2, "save_every": 1, **train}).to_dict()
    return cfg


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoint-1 and checkpoint-2, metrics, status, config)."""
    root = tmp_path_factory.mktemp("finished")
    cfg = tiny_config(train={"output_dir": str(root / "run"), "max_steps": 2, "save_every": 1})
    assert train(cfg)["state"] == "finished"
    return root / "run"


@pytest.fixture()
def work(tmp_path, finished, monkeypatch) -> dict[str, Path]:
    """A copy of the finished run, its config file and the bad files the rows use; cwd = tmp_path."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(_tiny_dict(run)))
    data = tmp_path / "data"
    data.mkdir()
    (data / "latin1.jsonl").write_bytes('{"question": "caf\xe9 2+2", "steps": [], "answer": "4"}\n'.encode("latin-1"))
    (data / "table.csv").write_text("question,answer\n2+2,4\n")
    (data / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (data / "a.yaml").write_text("base: b.yaml\ntrain: {lr: 0.1}\n")
    (data / "b.yaml").write_text("base: a.yaml\n")
    (data / "base5.yaml").write_text("base: 5\n")
    (data / "dup.yaml").write_text("train:\n  lr: 0.1\n  lr: 0.2\n")
    return {"run": run, "cfg": cfg, "data": data, "tmp": tmp_path}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) with its content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != LOCK_FILE:
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _kava(argv: list[str], capsys) -> tuple[int, str]:
    """Run the command in this process; an exception escaping ``main`` is a traceback."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    except BaseException as e:  # noqa: BLE001 - the point is to report it as a failure
        pytest.fail(f"kava {' '.join(map(str, argv))} raised {type(e).__name__}: {e}")
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# --- the bad inputs -------------------------------------------------------------------


def _truncate(path_of):
    def prep(w):
        p = path_of(w)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return prep


def _empty(path_of):
    return lambda w: path_of(w).write_bytes(b"")


def _corrupt_header(path_of):
    def prep(w):
        p = path_of(w)
        b = bytearray(p.read_bytes())
        b[12:20] = b"\xff" * 8  # inside the JSON header
        p.write_bytes(bytes(b))
    return prep


def _wrong_shape(w):
    p = w["run"] / "checkpoint-2" / WEIGHTS_FILE
    state = load_file(str(p))
    name = next(k for k in state if k.endswith("embed_tokens.weight"))
    state[name] = torch.zeros(3, 5)
    save_file(state, str(p))


WEIGHTS = lambda w: w["run"] / "checkpoint-2" / WEIGHTS_FILE  # noqa: E731
STATE = lambda w: w["run"] / "checkpoint-2" / STATE_TENSORS  # noqa: E731
TRAIN = ["train", "--config", "{cfg}", "--resume"]  # into the finished run: it must stay as it was
FRESH = ["train", "--config", "{cfg}", "train.output_dir={tmp}/fresh"]  # other data: a new run (a resume refuses it)
EVAL = ["eval", "--checkpoint", "{run}"]

CASES = [
    # id, preparation, command, exit code, what the message names
    # data sources, in training and evaluation
    ("train-non-utf8", None, [*FRESH, "data.train={data}/latin1.jsonl"], 1, ["latin1.jsonl:1", "UTF-8"]),
    ("train-unknown-dataset", None, [*FRESH, "data.train=gsm9k"], 1, ["gsm9k"]),
    ("train-csv", None, [*FRESH, "data.train={data}/table.csv"], 1, ["table.csv", ".csv"]),
    ("train-corrupt-parquet", None, [*FRESH, "data.train={data}/corrupt.parquet"], 1, ["corrupt.parquet"]),
    ("train-synthetic-option", None, [*FRESH, "data.train=synthetic?colour=red"], 1, ["synthetic", "colour"]),
    ("train-synthetic-split", None, [*FRESH, "data.train=synthetic?n=8", "data.train_split=dev"], 1, ["synthetic", "dev"]),
    ("train-synthetic-n-negative", None, [*FRESH, "data.train=synthetic?n=-5"], 1, ["n=-5"]),
    ("train-gsm-symbolic-lang-path", None, [*FRESH, "data.train=gsm-symbolic?lang=../../etc"], 1, ["lang", "../../etc"]),
    ("eval-non-utf8", None, [*EVAL, "--data", "{data}/latin1.jsonl"], 1, ["latin1.jsonl:1"]),
    ("eval-csv", None, [*EVAL, "--data", "{data}/table.csv"], 1, ["table.csv"]),
    ("eval-unknown-dataset", None, [*EVAL, "--data", "gsm9k"], 1, ["gsm9k"]),
    ("eval-synthetic-split", None, [*EVAL, "--data", "synthetic?n=4", "--split", "dev"], 1, ["dev"]),
    ("export-synthetic-n-negative", None, ["data", "export", "synthetic?n=-5", "--out", "{tmp}/out.jsonl"], 1, ["n=-5"]),
    # configs
    ("config-base-loop", None, ["train", "--config", "{data}/a.yaml"], 2, ["a.yaml", "loop"]),
    ("config-base-not-a-file", None, ["train", "--config", "{data}/base5.yaml"], 2, ["base5.yaml", "'base'"]),
    ("config-duplicate-key", None, ["train", "--config", "{data}/dup.yaml"], 2, ["dup.yaml:3", "duplicate key 'lr'"]),
    ("override-bad-yaml", None, [*TRAIN, "train.lr=[1"], 2, ["train.lr=[1"]),
    *[(f"value-{o.split('=')[0]}", None, [*TRAIN, o], 2, [o.split("=")[0]]) for o in (
        "train.log_every=0", "train.num_threads=-1", "train.weight_decay=-0.1", "eval.batch_size=0",
        "model.tiny.num_layers=0", "model.tiny.num_heads=0", "model.tiny.intermediate_size=0",
        "data.synthetic_modulus=0", "model.attn_implementation=foo", "eval.max_new_tokens=0",
        "train.max_steps=-1", "train.projection_lr=-1", "train.save_every=-1", "train.warmup_steps=-1",
        "data.train_limit=-1", "train.save_total_limit=-1", "train.lr=.inf",
    )],
    ("eval-limit-negative", None, [*EVAL, "--limit", "-3"], 2, ["data.eval_limit"]),
    ("eval-bad-mode", None, [*EVAL, "--modes", "student,dream"], 2, ["dream"]),
    # checkpoints
    ("eval-truncated-weights", _truncate(WEIGHTS), EVAL, 1, ["checkpoint-2/model.safetensors", "truncated"]),
    ("eval-empty-weights", _empty(WEIGHTS), EVAL, 1, ["checkpoint-2/model.safetensors"]),
    ("eval-corrupt-weights", _corrupt_header(WEIGHTS), EVAL, 1, ["checkpoint-2/model.safetensors"]),
    ("eval-wrong-shape", _wrong_shape, EVAL, 1, ["checkpoint-2/model.safetensors", "embed_tokens.weight", "(3, 5)"]),
    ("resume-truncated-weights", _truncate(WEIGHTS), TRAIN, 1, ["checkpoint-2/model.safetensors"]),
    ("resume-wrong-shape", _wrong_shape, TRAIN, 1, ["checkpoint-2/model.safetensors", "embed_tokens.weight"]),
    ("resume-truncated-state", _truncate(STATE), TRAIN, 1, ["checkpoint-2/kava_trainer_state.safetensors"]),
    ("resume-empty-state", _empty(STATE), TRAIN, 1, ["checkpoint-2/kava_trainer_state.safetensors"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_loses_nothing(case, work, capsys):
    _, prep, argv, code, names = case
    if prep is not None:
        prep(work)
    before = _snapshot(work["run"])
    got, err = _kava([a.format(**work) for a in argv], capsys)
    line = _one_error_line(err)
    assert got == code, err
    for name in names:
        assert name.format(**work) in line, line
    assert _snapshot(work["run"]) == before  # nothing written before the command is lost
    assert not (work["tmp"] / "out.jsonl").exists()


def test_the_command_itself_exits_with_one_line(work):
    """The same through a real process (a command that needs no torch, to stay quick): its exit
    status and stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "kava.cli", "config", "--show", str(work["data"] / "dup.yaml")],
                          capture_output=True, text=True, env=env, cwd=work["tmp"], timeout=300)
    assert proc.returncode == 2
    assert "dup.yaml:3" in _one_error_line(proc.stderr)


# --- a checkpoint never enables remote code -----------------------------------------------


@pytest.fixture()
def untrusted(tmp_path, monkeypatch) -> dict[str, Path]:
    """A model folder whose code writes RAN when imported, and a kava checkpoint whose saved
    config points at it with model.trust_remote_code=true."""
    import transformers.dynamic_module_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies such code
    code = tmp_path / "evil"
    code.mkdir()
    ran = tmp_path / "RAN"
    (code / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                                           "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (code / "evil.py").write_text(f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
                                  "raise SystemExit('evil code ran')\n")
    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    cfg = tiny_config(model={"name_or_path": str(code), "trust_remote_code": True, "adapter": "lora"}).to_dict()
    (ckpt / "kava_config.yaml").write_text(yaml.safe_dump(cfg))
    save_file({"projection.net.1.weight": torch.zeros(1)}, str(ckpt / WEIGHTS_FILE))
    small = tmp_path / "small.yaml"  # a small run, so that the teacher is reached quickly
    small.write_text(yaml.safe_dump(tiny_config().to_dict()))
    return {"code": code, "ckpt": ckpt, "ran": ran, "tmp": tmp_path, "cfg": small}


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{ckpt}"],
    ["eval", "--checkpoint", "{ckpt}", "model.trust_remote_code=false"],
    ["train", "--config", "{cfg}", "model.init_from={ckpt}", "model.name_or_path={code}", "train.output_dir={tmp}/r1"],
    ["train", "--config", "{cfg}", "teachers.models=[{{name_or_path: {ckpt}}}]", "train.output_dir={tmp}/r2"],
    ["export", "{ckpt}", "--out", "{tmp}/exported"],
], ids=["eval", "eval-explicit-false", "init_from", "teachers", "export"])
def test_a_checkpoint_cannot_enable_remote_code(argv, untrusted, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        got, err = _kava([a.format(**untrusted) for a in argv], capsys)
    assert got == 1
    line = _one_error_line(err)
    assert "trust_remote_code" in line and str(untrusted["code"]) in line
    assert not untrusted["ran"].exists()
    if argv[0] == "eval":
        assert any("cannot enable remote code" in r.getMessage() for r in caplog.records)


def test_the_inference_api_cannot_be_talked_into_remote_code_by_a_checkpoint(untrusted):
    import kava
    from kava.model.checkpoints import ModelLoadError

    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        kava.load(untrusted["ckpt"], device="cpu")
    assert not untrusted["ran"].exists()


def test_remote_code_runs_only_when_the_command_line_allows_it(untrusted, capsys):
    """The positive control: the same checkpoint with model.trust_remote_code=true given by the user."""
    with pytest.raises(SystemExit, match="evil code ran"):
        main(["eval", "--checkpoint", str(untrusted["ckpt"]), "model.trust_remote_code=true"])
    assert untrusted["ran"].exists()


# --- nothing lost ---------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_stops_naming_the_holder(work, capsys):
    lock = RunLock(work["run"])
    lock.acquire()  # as another run would hold it (flock conflicts across open files, in one process too)
    try:
        before = _snapshot(work["run"])
        got, err = _kava(["train", "--config", work["cfg"], "--resume"], capsys)
    finally:
        lock.release()
    line = _one_error_line(err)
    assert got == 1 and f"pid {os.getpid()}" in line and str(work["run"]) in line
    assert _snapshot(work["run"]) == before


def test_a_fresh_start_into_a_run_folder_is_refused_unless_overwrite(work, capsys):
    before = _snapshot(work["run"])
    got, err = _kava(["train", "--config", work["cfg"]], capsys)
    assert got == 1 and "--overwrite" in _one_error_line(err) and "not empty" in err
    assert _snapshot(work["run"]) == before
    (work["run"] / "notes.txt").write_text("mine")
    got, _ = _kava(["train", "--config", work["cfg"], "--overwrite", "train.max_steps=1"], capsys)
    assert got == 0
    left = sorted(p.name for p in work["run"].iterdir() if p.name.startswith("checkpoint-"))
    assert left == ["checkpoint-1"]  # the old run's checkpoint-2 is gone, so `kava eval` cannot pick it
    assert (work["run"] / "notes.txt").read_text() == "mine"  # files kava did not write are kept
    rows = [json.loads(x) for x in (work["run"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]


def test_resume_cuts_a_torn_metrics_line_and_the_report_skips_one(work, capsys, caplog):
    metrics = work["run"] / "metrics.jsonl"
    whole = metrics.read_text()
    metrics.write_text(whole + '{"step": 3, "lo')  # a full disk mid-append
    from kava.experiments.report import read_history

    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in read_history(work["run"])] == [1, 2]
    assert any("torn last line" in r.getMessage() for r in caplog.records)
    shutil.rmtree(work["run"] / "checkpoint-2")  # so the resume trains step 2 again (from checkpoint-1)
    got, _ = _kava(["train", "--config", work["cfg"], "--resume"], capsys)
    assert got == 0
    lines = metrics.read_text().splitlines()
    assert all(json.loads(x) for x in lines) and [json.loads(x)["step"] for x in lines] == [1, 2, 2]


def test_temporary_entries_of_a_killed_save_are_cleaned_and_a_moved_checkpoint_put_back(work, capsys):
    run = work["run"]
    (run / ".checkpoint-3.k9x2ab7q").mkdir()  # a save killed while building
    (run / ".checkpoint-3.k9x2ab7q" / WEIGHTS_FILE).write_bytes(b"half")
    (run / ".status.json.abcd1234.tmp").write_text("{")
    os.replace(run / "checkpoint-2", run / ".checkpoint-2.old")  # killed between the two renames
    got, _ = _kava(["train", "--config", work["cfg"], "--resume"], capsys)
    assert got == 0
    names = sorted(p.name for p in run.iterdir())
    assert not [n for n in names if n.startswith(".") and n != LOCK_FILE], names
    assert "checkpoint-2" in names
    assert json.loads((run / "status.json").read_text())["step"] == 2  # resumed from the restored checkpoint


def test_save_total_limit_keeps_the_newest(tmp_path):
    cfg = tiny_config(train={"output_dir": str(tmp_path / "r"), "max_steps": 3, "save_every": 1, "save_total_limit": 2})
    train(cfg)
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """Weights poisoned by an update: the run stops before writing them; the last checkpoint
    stays good, status.json says failed, and resume starts from it."""
    import kava.training.loop as loop

    real = loop.train_step

    def poisoned(run):
        real(run)
        if run.step == 2:
            with torch.no_grad():
                next(p for p in run.model.parameters() if p.requires_grad).fill_(float("nan"))

    monkeypatch.setattr(loop, "train_step", poisoned)
    cfg = tiny_config(train={"output_dir": str(tmp_path / "r"), "max_steps": 3, "save_every": 1})
    with pytest.raises(TrainingError, match="non-finite weights at step 2"):
        train(cfg)
    run = tmp_path / "r"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoint-1" / WEIGHTS_FILE)).values())
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "failed" and "non-finite weights" in status["error"] and status["checkpoint"].endswith("checkpoint-1")


def test_a_crash_outside_a_sweep_marks_the_run_failed(tmp_path, monkeypatch):
    import kava.training.loop as loop

    def boom(run):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(loop, "train_step", boom)
    with pytest.raises(RuntimeError):
        train(tiny_config(train={"output_dir": str(tmp_path / "r")}))
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == "RuntimeError: disk on fire"


@pytest.mark.parametrize("when", ["training", "final-eval"])
def test_a_signal_saves_marks_interrupted_and_exits_128_plus_signum(when, tmp_path, monkeypatch, capsys):
    import kava.training.loop as loop

    if when == "training":
        real = loop.train_step

        def step(run):
            real(run)
            if run.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        monkeypatch.setattr(loop, "train_step", step)
    else:
        def evaluate(run, out):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("the signal should have stopped the evaluation")

        monkeypatch.setattr(loop, "evaluate_model", evaluate)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tiny_dict(tmp_path / "r", max_steps=3, eval_at_end=True)))
    got, _ = _kava(["train", "--config", cfg], capsys)
    assert got == 128 + signal.SIGTERM
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["signal"] == signal.SIGTERM
    assert (tmp_path / "r" / f"checkpoint-{status['step']}" / WEIGHTS_FILE).is_file()
    assert status["step"] == (1 if when == "training" else 3)


def test_outputs_respect_the_umask(tmp_path):
    """What checkpoints (folders built aside), status files and metrics lines are written with."""
    import kava.io as kio

    old = os.umask(0o027)
    try:
        kio.atomic_replace_dir(tmp_path / "checkpoint-1", lambda t: (t / "tokenizer").mkdir() or (t / WEIGHTS_FILE).write_bytes(b"w"))
        kio.atomic_write_json(tmp_path / "status.json", {"state": "running"})
        kio.append_line(tmp_path / "metrics.jsonl", '{"step": 1}')
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert mode("checkpoint-1") == mode("checkpoint-1/tokenizer") == 0o750
    assert mode(f"checkpoint-1/{WEIGHTS_FILE}") == mode("status.json") == mode("metrics.jsonl") == 0o640


def test_atomic_writes_sync_the_file_and_its_folder_before_and_after_the_rename(tmp_path, monkeypatch):
    import kava.io as kio

    synced = []
    real = kio._fsync_path
    monkeypatch.setattr(kio, "_fsync_path", lambda p: (synced.append(Path(p)), real(p)))
    kio.atomic_write_text(tmp_path / "a.txt", "x")
    assert synced[0].name.startswith(".a.txt.") and synced[1] == tmp_path
    synced.clear()
    kio.atomic_replace_dir(tmp_path / "d", lambda t: (t / "f").write_text("y"))
    assert any(p.name == "f" for p in synced) and synced[-1] == tmp_path


# --- sweeps and reports -----------------------------------------------------------------


def test_an_edited_sweep_stops_instead_of_reusing_old_runs(tmp_path, monkeypatch, capsys):
    from kava.experiments.sweep import expand_sweep, plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_config().to_dict()))
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base_config: base.yaml\noutput_dir: runs/s\nruns: {a: {train.lr: 0.001}}\n")
    (spec,) = expand_sweep(sweep)
    spec.output_dir.mkdir(parents=True)
    spec.config().save(spec.output_dir / "config.yaml")  # as the finished run left it
    (spec.output_dir / "status.json").write_text('{"state": "finished"}')
    assert plan([spec]) == [(spec, "skip")]
    sweep.write_text("base_config: base.yaml\noutput_dir: runs/s\nruns: {a: {train.lr: 0.002}}\n")
    before = _snapshot(spec.output_dir)
    got, err = _kava(["sweep", sweep], capsys)
    line = _one_error_line(err)
    assert got == 2 and "train.lr is 0.001" in line and "0.002 now" in line and "--overwrite" in line
    assert _snapshot(spec.output_dir) == before
    (spec,) = expand_sweep(sweep)
    assert plan([spec], overwrite=True) == [(spec, "restart")]


def _report_run(root: Path, name: str, seed: int, acc: float) -> Path:
    d = root / name / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "status.json").write_text(json.dumps({"state": "finished", "step": 2, "max_steps": 2}))
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"train": "synthetic", "eval": "synthetic"}, "train": {"seed": seed}}))
    (d / "eval_metrics.json").write_text(json.dumps({"student": {"n": 10, "accuracy": acc, "forward_passes": 6.0}}))
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    return d


@pytest.mark.parametrize("file,content,names", [
    ("config.yaml", "data: [unclosed\n", ["config.yaml:2"]),
    ("status.json", "{not json", ["status.json"]),
    ("eval_metrics.json", '{"student": 0.5}', ["eval_metrics.json"]),
    ("metrics.jsonl", '{"step": 1}\n{oops\n{"step": 2}\n', ["metrics.jsonl:2"]),
], ids=["config", "status", "eval_metrics", "metrics-middle-line"])
def test_report_skips_a_run_with_a_malformed_file_and_writes_the_rest(file, content, names, tmp_path, capsys, caplog):
    good = _report_run(tmp_path / "runs", "rkv", 0, 0.9)
    bad = _report_run(tmp_path / "runs", "codi", 0, 0.4)
    (bad / file).write_text(content)
    with caplog.at_level(logging.WARNING):
        got, err = _kava(["report", tmp_path / "runs", "--out", tmp_path / "rep"], capsys)
    assert got == 0 and "Traceback" not in err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "skipping run" in r.getMessage()]
    assert len(warnings) == 1 and all(n in warnings[0] for n in names) and str(bad) in warnings[0]
    table = (tmp_path / "rep" / "runs.csv").read_text()
    assert str(good) in table and str(bad) not in table


def test_report_keeps_a_run_whose_metrics_end_in_a_torn_line(tmp_path, capsys):
    run = _report_run(tmp_path / "runs", "rkv", 0, 0.9)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')
    got, _ = _kava(["report", tmp_path / "runs", "--out", tmp_path / "rep"], capsys)
    assert got == 0 and str(run) in (tmp_path / "rep" / "runs.csv").read_text()


# --- an offline teacher cache and the evaluation at the end -----------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """An offline teacher cache of the first 8 training examples, in two shards."""
    from kava.distill.extract import extract

    out = tmp_path_factory.mktemp("cache") / "cache"
    extract(tiny_config(loss={"teacher_ce": 0.0}, data={"train_limit": 8}), out, shard_size=4)
    return out


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_cache_shard_is_named_before_training(damage, cache, tmp_path, capsys):
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    shard = copy / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:100] if damage == "truncated" else b"")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(loss={"teacher_ce": 0.0, "teacher_cache": str(copy)}, data={"train_limit": 8},
                                              train={"output_dir": str(tmp_path / "r")}).to_dict()))
    got, err = _kava(["train", "--config", cfg], capsys)
    assert got == 2 and str(shard) in _one_error_line(err)
    assert not (tmp_path / "r" / "status.json").exists()  # stopped before the run started


def test_training_from_a_cache_with_eval_at_end_skips_the_kv_probe(cache, tmp_path, caplog):
    """The cache holds training examples only; the live teacher is not what the student was
    distilled towards, so the probe is skipped with a note and the evaluation still runs."""
    cfg = tiny_config(loss={"teacher_ce": 0.0, "teacher_cache": str(cache)}, data={"train_limit": 8},
                      train={"output_dir": str(tmp_path / "r"), "max_steps": 2, "eval_at_end": True})
    with caplog.at_level(logging.INFO):
        res = train(cfg)
    assert res["state"] == "finished" and res["eval"]["student"]["n"] == 16
    assert not (tmp_path / "r" / "kv_cosine.json").exists()
    notes = [r.getMessage() for r in caplog.records if "kv probe skipped" in r.getMessage()]
    assert len(notes) == 1 and len(notes[0].splitlines()) == 1

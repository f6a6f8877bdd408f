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
from kava.model.checkpoints import STATE_JSON, STATE_TENSORS, WEIGHTS_FILE
from kava.model.tokenizer import build_synthetic_tokenizer
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
    _bad_files(data)
    (tmp_path / "afile").write_text("a user's file\n")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    return {"run": run, "cfg": cfg, "data": data, "tmp": tmp_path}


def _bad_files(data: Path) -> None:
    """Data and config files that are wrong in ways a reader must name."""
    rec = '{"question": "2+2", "steps": [], "answer": "4"}'
    (data / "empty.jsonl").write_bytes(b"")
    (data / "blank.jsonl").write_text("\n   \n\t\n")
    (data / "empty.json").write_text("[]")
    (data / "empty-data.json").write_text('{"data": []}')
    (data / "blank.json").write_text("  \n")
    (data / "deep.jsonl").write_text("[" * 5000 + "]" * 5000 + "\n")
    (data / "deep.json").write_text('{"a": ' * 100 + "1" + "}" * 100)
    (data / "surrogate.jsonl").write_text('{"question": "caf\\ud800 2+2", "steps": [], "answer": "4"}\n')
    (data / "digits.jsonl").write_text(json.dumps({"question": "2+2", "steps": [], "answer": "9" * 5000}) + "\n")
    (data / "digits-int.jsonl").write_text('{"question": "2+2", "steps": [], "answer": ' + "9" * 5000 + "}\n")
    (data / "dupkey.jsonl").write_text(rec + "\n" + '{"question": "2+2", "answer": "4", "answer": "5"}\n')
    (data / "long.jsonl").write_text(rec + "\n" + json.dumps({"question": "x" * (1 << 21), "answer": "1"}) + "\n")
    (data / "list.jsonl").write_text("[1, 2]\n")
    (data / "bomb.yaml").write_text(
        "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 10)}]\n" for p, k in zip("abcde", "bcdef"))
    )
    (data / "loop-alias.yaml").write_text("train: &t {lr: 0.1, more: *t}\n")
    (data / "unhashable.yaml").write_text("train:\n  [1, 2]: 3\n")
    (data / "deep-list.yaml").write_text("train: " + "[" * 3000 + "]" * 3000 + "\n")
    (data / "list.yaml").write_text("- 1\n- 2\n")
    (data / "digits.yaml").write_text("train: {batch_size: " + "9" * 5000 + "}\n")
    (data / "base-dir.yaml").write_text("base: .\n")
    (data / "one.jsonl").write_text(rec + "\n")
    (data / "sweep.yaml").write_text("base_config: ../tiny.yaml\noutput_dir: sw\nseeds: [0]\n")
    (data / "sweep-huge.yaml").write_text(
        "base_config: ../tiny.yaml\ngrid:\n"
        + "".join(
            f"  {k}: [{', '.join(str(i + 1) for i in range(10))}]\n"
            for k in (
                "train.lr",
                "train.weight_decay",
                "loss.alpha_kv",
                "loss.alpha_codi",
                "loss.teacher_ce",
                "loss.student_ce",
                "train.grad_clip",
            )
        )
    )
    for i in range(40):  # a base: chain 40 files deep
        (data / f"chain{i}.yaml").write_text(f"base: chain{i + 1}.yaml\n" if i < 39 else "train: {lr: 0.1}\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"question": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), data / "zero.parquet"
    )


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


def _unlink(path_of):
    return lambda w: path_of(w).unlink()


def _write(path_of, text):
    return lambda w: path_of(w).write_text(text)


def _state_key(key, value):
    def prep(w):
        p = STATE_J(w)
        meta = json.loads(p.read_text())
        meta[key] = value
        p.write_text(json.dumps(meta))

    return prep


def _progress(**changes):
    def prep(w):
        p = STATE_J(w)
        meta = json.loads(p.read_text())
        meta["progress"].update(changes)
        p.write_text(json.dumps(meta))

    return prep


def _link(name):
    """``name`` in the run folder replaced by a symbolic link to a file outside it."""

    def prep(w):
        target = w["tmp"] / f"outside-{name}"
        target.write_text("not kava's\n")
        p = w["run"] / name
        if p.exists():
            p.unlink()
        os.symlink(target, p)

    return prep


def _extra_tensor(w):
    p = w["run"] / "checkpoint-2" / WEIGHTS_FILE
    save_file({**load_file(str(p)), "evil.weight": torch.zeros(1)}, str(p))


def _nan_weights(w):
    p = w["run"] / "checkpoint-2" / WEIGHTS_FILE
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(p)).items()}, str(p))


def CKPT(name):  # noqa: N802 - reads like the path constants below
    return lambda w: w["run"] / "checkpoint-2" / name


def _link_checkpoint(w):
    os.symlink(w["run"] / "checkpoint-2", w["run"] / "checkpoint-3")


WEIGHTS = lambda w: w["run"] / "checkpoint-2" / WEIGHTS_FILE  # noqa: E731
STATE = lambda w: w["run"] / "checkpoint-2" / STATE_TENSORS  # noqa: E731
STATE_J = lambda w: w["run"] / "checkpoint-2" / STATE_JSON  # noqa: E731
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
    (
        "train-synthetic-split",
        None,
        [*FRESH, "data.train=synthetic?n=8", "data.train_split=dev"],
        1,
        ["synthetic", "dev"],
    ),
    ("train-synthetic-n-negative", None, [*FRESH, "data.train=synthetic?n=-5"], 1, ["n=-5"]),
    *[
        (f"train-{name}", None, [*FRESH, f"data.train={{data}}/{name}"], 1, [f"{name}{where}", *more])
        for name, where, more in (
            ("empty.jsonl", "", ["no training examples"]),
            ("blank.jsonl", "", ["no training examples"]),
            ("empty.json", "", ["no training examples"]),
            ("empty-data.json", "", ["no training examples"]),
            ("blank.json", "", ["empty file"]),
            ("zero.parquet", "", ["no training examples"]),
            ("deep.jsonl", ":1", ["nested too deeply"]),
            ("deep.json", "", ["nested too deeply"]),
            ("surrogate.jsonl", ":1", ["'question'", "surrogate"]),
            ("digits.jsonl", ":1", ["'answer'", "5000 characters"]),
            ("digits-int.jsonl", ":1", ["unreadable"]),
            ("dupkey.jsonl", ":2", ["duplicate key 'answer'"]),
            ("long.jsonl", ":2", ["longer than"]),
            ("list.jsonl", ":1", ["expected a record (object)"]),
        )
    ],
    ("eval-empty-jsonl", None, [*EVAL, "--data", "{data}/empty.jsonl"], 1, ["empty.jsonl", "no evaluation examples"]),
    ("eval-surrogate", None, [*EVAL, "--data", "{data}/surrogate.jsonl"], 1, ["surrogate.jsonl:1", "question"]),
    (
        "export-surrogate",
        None,
        ["data", "export", "{data}/surrogate.jsonl", "--out", "{tmp}/out.jsonl"],
        1,
        ["surrogate.jsonl:1"],
    ),
    (
        "train-gsm-symbolic-lang-path",
        None,
        [*FRESH, "data.train=gsm-symbolic?lang=../../etc"],
        1,
        ["lang", "../../etc"],
    ),
    ("eval-non-utf8", None, [*EVAL, "--data", "{data}/latin1.jsonl"], 1, ["latin1.jsonl:1"]),
    ("eval-csv", None, [*EVAL, "--data", "{data}/table.csv"], 1, ["table.csv"]),
    ("eval-unknown-dataset", None, [*EVAL, "--data", "gsm9k"], 1, ["gsm9k"]),
    ("eval-synthetic-split", None, [*EVAL, "--data", "synthetic?n=4", "--split", "dev"], 1, ["dev"]),
    (
        "export-synthetic-n-negative",
        None,
        ["data", "export", "synthetic?n=-5", "--out", "{tmp}/out.jsonl"],
        1,
        ["n=-5"],
    ),
    # configs
    ("config-base-loop", None, ["train", "--config", "{data}/a.yaml"], 2, ["a.yaml", "loop"]),
    ("config-base-not-a-file", None, ["train", "--config", "{data}/base5.yaml"], 2, ["base5.yaml", "'base'"]),
    ("config-duplicate-key", None, ["train", "--config", "{data}/dup.yaml"], 2, ["dup.yaml:3", "duplicate key 'lr'"]),
    ("override-bad-yaml", None, [*TRAIN, "train.lr=[1"], 2, ["train.lr=[1"]),
    ("config-alias-bomb", None, ["train", "--config", "{data}/bomb.yaml"], 2, ["bomb.yaml", "alias"]),
    ("config-alias-loop", None, ["train", "--config", "{data}/loop-alias.yaml"], 2, ["loop-alias.yaml", "alias"]),
    ("config-unhashable-key", None, ["train", "--config", "{data}/unhashable.yaml"], 2, ["unhashable.yaml:2", "key"]),
    ("config-deeply-nested", None, ["train", "--config", "{data}/deep-list.yaml"], 2, ["deep-list.yaml"]),
    ("config-top-level-list", None, ["train", "--config", "{data}/list.yaml"], 2, ["list.yaml", "mapping"]),
    ("config-base-chain-40", None, ["train", "--config", "{data}/chain0.yaml"], 2, ["'base' chain deeper than 32"]),
    (
        "config-given-twice",
        None,
        ["train", "--config", "{cfg}", "--config", "{data}/a.yaml"],
        2,
        ["--config given twice"],
    ),
    ("config-missing", None, ["train", "--config", "{data}/nope.yaml"], 2, ["nope.yaml"]),
    ("config-is-a-folder", None, ["train", "--config", "{data}"], 2, ["{data}"]),
    ("config-overrides-without-show", None, ["config", "train.lr=1"], 2, ["--show"]),
    ("override-repeated", None, [*TRAIN, "train.lr=0.1", "train.lr=0.2"], 2, ["train.lr=0.2", "train.lr=0.1"]),
    (
        "override-section-and-key",
        None,
        [*TRAIN, "train={{lr: 0.1}}", "train.lr=0.2"],
        2,
        ["train.lr", "train={{lr: 0.1}}"],
    ),
    ("override-deeply-nested", None, [*TRAIN, "train.lr=" + "[" * 3000], 2, ["train.lr"]),
    (
        "override-alias-bomb",
        None,
        [*TRAIN, "train.lr=[&a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(["*a"] * 9) + "]"],
        2,
        [],
    ),
    # sizes that cannot run, refused before anything is built (each bound can be raised: limits.*)
    *[
        (f"bound-{o.split('=')[0]}", None, [*TRAIN, o], 2, [o.split("=")[0], f"limits.{lim}"])
        for o, lim in (
            ("train.batch_size=1000000000", "max_batch_size"),
            ("train.max_steps=1000000000000000000", "max_steps"),
            ("train.epochs=1e300", "max_epochs"),
            ("latent.iterations=1000000", "max_iterations"),
            ("latent.num_latents=1000000", "max_latents"),
            ("model.tiny.hidden_size=1000000000", "max_width"),
            ("model.tiny.num_layers=100000", "max_layers"),
            ("eval.batch_size=100000", "max_batch_size"),
            ("train.effective_batch=1000000", "max_batch_size"),
            ("eval.max_new_tokens=10000000", "max_tokens"),
            ("data.synthetic_train_size=1000000000", "max_examples"),
            ("train.num_threads=100000", "max_threads"),
            ("model.tiny.max_position_embeddings=100000000", "max_positions"),
            ("model.lora_r=100000000", "max_width"),
        )
    ],
    (
        "bound-memory",
        None,
        [
            *TRAIN,
            "model.tiny.hidden_size=16384",
            "model.tiny.num_heads=16",
            "model.tiny.num_kv_heads=16",
            "model.tiny.num_layers=200",
            "model.tiny.intermediate_size=16384",
        ],
        2,
        ["model.tiny", "GiB", "limits.memory_fraction"],
    ),
    (
        "positions-cannot-hold-latents",
        None,
        [*TRAIN, "model.tiny.max_position_embeddings=8"],
        2,
        ["model.tiny.max_position_embeddings", "num_latents"],
    ),
    ("heads-do-not-divide", None, [*TRAIN, "model.tiny.hidden_size=30"], 2, ["model.tiny.hidden_size", "num_heads"]),
    ("seed-negative", None, [*TRAIN, "train.seed=-1"], 2, ["train.seed"]),
    ("seed-2-64", None, [*TRAIN, "train.seed=18446744073709551616"], 2, ["train.seed"]),
    ("lora-targets-empty", None, [*TRAIN, "model.lora_target_modules=[]"], 2, ["model.lora_target_modules"]),
    ("lora-targets-not-strings", None, [*TRAIN, "model.lora_target_modules=[1, 2]"], 2, ["model.lora_target_modules"]),
    ("limit-negative", None, [*TRAIN, "limits.max_steps=-1"], 2, ["limits.max_steps"]),
    ("demo-threads-0", None, ["demo", "--threads", "0", "--out", "{tmp}/demo"], 2, ["--threads"]),
    ("env-max-batch-negative", None, ["env", "--find-batch", "--max-batch", "-4"], 2, ["--max-batch"]),
    (
        "teacher-batch-negative",
        None,
        ["teacher", "extract", "--config", "{cfg}", "--out", "{tmp}/c", "--batch-size", "-2"],
        2,
        ["--batch-size"],
    ),
    (
        "teacher-out-is-a-file",
        None,
        ["teacher", "extract", "--config", "{cfg}", "--out", "{tmp}/afile"],
        1,
        ["afile", "a file"],
    ),
    ("eval-out-is-a-file", None, [*EVAL, "--out", "{tmp}/afile"], 1, ["--out", "afile", "a file"]),
    ("eval-out-dangling-link", None, [*EVAL, "--out", "{tmp}/dangling"], 1, ["--out", "dangling symbolic link"]),
    ("report-out-is-a-file", None, ["report", "{tmp}", "--out", "{tmp}/afile"], 1, ["afile", "a file"]),
    (
        "train-output-dir-is-a-file",
        None,
        ["train", "--config", "{cfg}", "train.output_dir={tmp}/afile"],
        1,
        ["afile", "a file"],
    ),
    (
        "train-output-dir-dangling",
        None,
        ["train", "--config", "{cfg}", "train.output_dir={tmp}/dangling"],
        1,
        ["dangling symbolic link"],
    ),
    (
        "train-lora-unknown-target",
        None,
        [
            "train",
            "--config",
            "{cfg}",
            "train.output_dir={tmp}/r9",
            "model.adapter=lora",
            "model.lora_target_modules=[q_proj, wormhole]",
        ],
        1,
        ["'wormhole'", "q_proj"],
    ),
    *[
        (f"value-{o.split('=')[0]}", None, [*TRAIN, o], 2, [o.split("=")[0]])
        for o in (
            "train.log_every=0",
            "train.num_threads=-1",
            "train.weight_decay=-0.1",
            "eval.batch_size=0",
            "model.tiny.num_layers=0",
            "model.tiny.num_heads=0",
            "model.tiny.intermediate_size=0",
            "data.synthetic_modulus=0",
            "model.attn_implementation=foo",
            "eval.max_new_tokens=0",
            "train.max_steps=-1",
            "train.projection_lr=-1",
            "train.save_every=-1",
            "train.warmup_steps=-1",
            "data.train_limit=-1",
            "train.save_total_limit=-1",
            "train.lr=.inf",
        )
    ],
    ("eval-limit-negative", None, [*EVAL, "--limit", "-3"], 2, ["--limit", "-3"]),
    ("eval-bad-mode", None, [*EVAL, "--modes", "student,dream"], 2, ["dream"]),
    ("eval-modes-repeated", None, [*EVAL, "--modes", "student,student"], 2, ["student given twice"]),
    ("eval-modes-empty", None, [*EVAL, "--modes", ""], 2, ["eval modes", "''"]),
    ("eval-override-architecture", None, [*EVAL, "model.tiny.num_layers=3"], 2, ["model.tiny.num_layers", "2"]),
    ("eval-override-adapter", None, [*EVAL, "model.adapter=lora"], 2, ["model.adapter"]),
    # found by a later hostile pass: each was a traceback, a hang or a silent accept
    ("yaml-int-too-long", None, ["train", "--config", "{data}/digits.yaml"], 2, ["digits.yaml:1", "5,000 digits"]),
    ("override-int-too-long", None, [*TRAIN, "train.batch_size=" + "9" * 5000], 2, ["train.batch_size", "digits"]),
    ("override-key-control-char", None, [*TRAIN, "train.\nlr=1"], 2, ["control character"]),
    (
        "nul-in-output-dir",
        None,
        ["train", "--config", "{cfg}", 'train.output_dir="a\\0b"'],
        2,
        ["train.output_dir", "NUL"],
    ),
    ("nul-in-data-file", None, [*FRESH, 'data.train="x\\0.jsonl"'], 2, ["data.train", "NUL"]),
    ("config-is-a-pipe", None, ["train", "--config", "/dev/zero"], 2, ["/dev/zero", "not a regular file"]),
    ("config-base-is-a-folder", None, ["train", "--config", "{data}/base-dir.yaml"], 2, ["base-dir.yaml", "a folder"]),
    (
        "output-dir-in-checkpoint",
        None,
        ["train", "--config", "{cfg}", "train.output_dir={run}/checkpoint-2/sub"],
        1,
        ["train.output_dir", "inside the kava checkpoint", "checkpoint-2"],
    ),
    (
        "output-dir-is-checkpoint",
        None,
        ["train", "--config", "{cfg}", "--overwrite", "train.output_dir={run}/checkpoint-2"],
        1,
        ["inside the kava checkpoint"],
    ),
    (
        "output-dir-name-too-long",
        None,
        ["train", "--config", "{cfg}", "train.output_dir={tmp}/" + "x" * 300],
        1,
        ["train.output_dir"],
    ),
    (
        "output-dir-cannot-create",
        None,
        ["train", "--config", "{cfg}", "train.output_dir=/proc/kava"],
        1,
        ["train.output_dir", "create"],
    ),
    ("train-data-is-a-folder", None, [*FRESH, "data.train={data}"], 1, ["a folder, not a data file"]),
    ("train-format-unknown-synthetic", None, [*FRESH, "data.format=csv"], 2, ["data.format", "'csv'"]),
    ("synthetic-n-beyond-bound", None, [*FRESH, "data.train=synthetic?n=100000000000"], 1, ["n=100,000,000,000"]),
    ("synthetic-option-twice", None, [*FRESH, "data.train=synthetic?n=4&n=5"], 1, ["option n given twice"]),
    (
        "data-export-onto-itself",
        None,
        ["data", "export", "{data}/one.jsonl", "--out", "{data}/one.jsonl"],
        1,
        ["--out", "the file being exported"],
    ),
    (
        "data-export-out-folder",
        None,
        ["data", "export", "{data}/one.jsonl", "--out", "{data}"],
        1,
        ["--out", "a folder"],
    ),
    ("data-export-out-empty", None, ["data", "export", "{data}/one.jsonl", "--out", ""], 1, ["--out", "empty"]),
    (
        "data-export-limit-negative",
        None,
        ["data", "export", "{data}/one.jsonl", "--limit", "-1", "--out", "o"],
        2,
        ["--limit"],
    ),
    ("data-export-n-huge", None, ["data", "export", "synthetic?n=100000000000", "--out", "{tmp}/o.jsonl"], 1, ["n="]),
    ("data-validate-pipe", None, ["data", "validate", "/dev/null"], 1, ["/dev/null", "not a regular file"]),
    ("eval-modes-empty-list", None, [*EVAL, "--modes", ","], 2, ["eval modes"]),
    (
        "export-push-bad-repo-id",
        None,
        ["export", "{run}", "--out", "{tmp}/exp", "--push-to-hub", "a/b/c"],
        1,
        ["--push-to-hub", "'a/b/c'"],
    ),
    ("report-success-at-nan", None, ["report", "{tmp}", "--success-at", "nan"], 2, ["--success-at", "nan"]),
    ("report-success-at-negative", None, ["report", "{tmp}", "--success-at", "-0.5"], 2, ["--success-at"]),
    ("report-method-unknown-role", None, ["report", "{tmp}", "--method", "wizard=x"], 2, ["'wizard'", "kava"]),
    (
        "report-method-role-twice",
        None,
        ["report", "{tmp}", "--method", "kava=a", "--method", "kava=b"],
        2,
        ["role kava", "kava=a"],
    ),
    ("report-claims-empty", None, ["report", "{tmp}", "--claims", ""], 2, ["--claims"]),
    (
        "sweep-seeds-range-huge",
        None,
        ["sweep", "{data}/sweep.yaml", "--dry-run", "--seeds", "0-999999999999"],
        2,
        ["--seeds", "100,000"],
    ),
    (
        "sweep-grid-too-many-runs",
        None,
        ["sweep", "{data}/sweep-huge.yaml", "--dry-run"],
        2,
        ["sweep-huge.yaml", "10,000,000 runs"],
    ),
    (
        "sweep-set-twice",
        None,
        ["sweep", "{data}/sweep.yaml", "--dry-run", "--set", "train.lr=1", "--set", "train.lr=2"],
        2,
        ["--set train.lr", "twice"],
    ),
    *[
        (
            f"sweep-{flag[2:]}-{value}",
            None,
            ["sweep", "{data}/sweep.yaml", "--pbs", "{tmp}/pbs", flag, value],
            2,
            [flag],
        )
        for flag, value in (("--time", "-5"), ("--gpus", "-1"), ("--cpus", "0"), ("--mem-gb", "nan"))
    ],
    (
        "sweep-array-parallelism-0",
        None,
        ["sweep", "{data}/sweep.yaml", "--array-parallelism", "0"],
        2,
        ["--array-parallelism"],
    ),
    (
        "sweep-queue-newline",
        None,
        ["sweep", "{data}/sweep.yaml", "--pbs", "{tmp}/pbs", "--queue", "q\n#PBS -l x"],
        2,
        ["--queue", "newline"],
    ),
    (
        "teacher-out-in-checkpoint",
        None,
        ["teacher", "extract", "--config", "{cfg}", "--out", "{run}/checkpoint-2/cache"],
        1,
        ["--out", "inside the kava checkpoint"],
    ),
    ("teacher-out-is-run", None, ["teacher", "extract", "--config", "{cfg}", "--out", "{run}"], 1, ["a run folder"]),
    (
        "teacher-batch-beyond-bound",
        None,
        ["teacher", "extract", "--config", "{cfg}", "--out", "{tmp}/c", "--batch-size", "100000000"],
        2,
        ["--batch-size", "limits.max_batch_size"],
    ),
    # checkpoints
    ("eval-truncated-weights", _truncate(WEIGHTS), EVAL, 1, ["checkpoint-2/model.safetensors", "truncated"]),
    ("eval-empty-weights", _empty(WEIGHTS), EVAL, 1, ["checkpoint-2/model.safetensors"]),
    ("eval-corrupt-weights", _corrupt_header(WEIGHTS), EVAL, 1, ["checkpoint-2/model.safetensors"]),
    ("eval-wrong-shape", _wrong_shape, EVAL, 1, ["checkpoint-2/model.safetensors", "embed_tokens.weight", "(3, 5)"]),
    ("eval-foreign-tensor", _extra_tensor, EVAL, 1, ["checkpoint-2/model.safetensors", "'evil.weight'"]),
    ("eval-nan-weights", _nan_weights, EVAL, 1, ["checkpoint-2", "embed_tokens.weight", "NaN"]),
    ("eval-tokenizer-not-json", _write(CKPT("tokenizer.json"), "{oops"), EVAL, 1, ["checkpoint-2/tokenizer.json"]),
    ("eval-tokenizer-empty-object", _write(CKPT("tokenizer.json"), "{}"), EVAL, 1, ["tokenizer.json", "added_tokens"]),
    ("eval-config-json-list", _write(CKPT("config.json"), "[1]"), EVAL, 1, ["checkpoint-2/config.json", "object"]),
    (
        "eval-config-json-wrong-type",
        _write(CKPT("config.json"), '{"model_type": "llama", "hidden_size": "big"}'),
        EVAL,
        1,
        ["checkpoint-2/config.json", "hidden_size"],
    ),
    ("eval-generation-config-nan", _write(CKPT("generation_config.json"), '{"temperature": NaN}'), EVAL, 1, ["NaN"]),
    ("resume-truncated-weights", _truncate(WEIGHTS), TRAIN, 1, ["checkpoint-2/model.safetensors"]),
    ("resume-wrong-shape", _wrong_shape, TRAIN, 1, ["checkpoint-2/model.safetensors", "embed_tokens.weight"]),
    ("resume-truncated-state", _truncate(STATE), TRAIN, 1, ["checkpoint-2/kava_trainer_state.safetensors"]),
    ("resume-empty-state", _empty(STATE), TRAIN, 1, ["checkpoint-2/kava_trainer_state.safetensors"]),
    # a damaged newest checkpoint is never silently replaced by an older one
    ("resume-state-json-gone", _unlink(STATE_J), TRAIN, 1, ["checkpoint-2", "kava_trainer_state.json", "checkpoint-1"]),
    ("eval-state-json-gone", _unlink(STATE_J), EVAL, 1, ["checkpoint-2", "kava_trainer_state.json", "checkpoint-1"]),
    ("resume-state-json-garbage", _write(STATE_J, "{not json"), TRAIN, 1, ["checkpoint-2/kava_trainer_state.json"]),
    ("resume-state-json-deep", _write(STATE_J, "[" * 100000), TRAIN, 1, ["checkpoint-2/kava_trainer_state.json"]),
    ("resume-step-string", _progress(step="2"), TRAIN, 1, ["checkpoint-2/kava_trainer_state.json", "'2'"]),
    ("resume-step-huge", _progress(step=10**6), TRAIN, 1, ["checkpoint-2/kava_trainer_state.json", "1000000"]),
    ("resume-step-beyond-max", None, [*TRAIN, "train.max_steps=1"], 2, ["train.max_steps", "2 -> 1"]),
    ("resume-offset-huge", _progress(offset=10**9), TRAIN, 1, ["checkpoint-2/kava_trainer_state.json", "offset"]),
    (
        "resume-scheduler-damaged",
        _state_key("scheduler", {"nonsense": 1}),
        TRAIN,
        1,
        ["checkpoint-2/kava_trainer_state.json"],
    ),
    (
        "eval-pickle-beside",
        _write(lambda w: w["run"] / "checkpoint-2" / "pytorch_model.bin", "x"),
        EVAL,
        1,
        ["pytorch_model.bin", "safetensors", "never unpickles"],
    ),
    (
        "resume-pickle-beside",
        _write(lambda w: w["run"] / "checkpoint-2" / "optimizer.pt", "x"),
        TRAIN,
        1,
        ["optimizer.pt"],
    ),
    # symbolic links inside a run folder are never followed
    ("resume-metrics-symlink", _link("metrics.jsonl"), TRAIN, 1, ["metrics.jsonl", "symbolic link"]),
    ("resume-lock-symlink", _link(LOCK_FILE), TRAIN, 1, [LOCK_FILE, "symbolic link"]),
    ("resume-status-symlink", _link("status.json"), TRAIN, 1, ["status.json", "symbolic link"]),
    (
        "overwrite-checkpoint-symlink",
        _link_checkpoint,
        ["train", "--config", "{cfg}", "--overwrite"],
        1,
        ["checkpoint-3", "symbolic link"],
    ),
    ("eval-checkpoint-symlink", _link_checkpoint, EVAL, 1, ["checkpoint-3", "symbolic link"]),
    # --overwrite checks the whole run before deleting the old one
    *[
        (f"overwrite-{name}", None, ["train", "--config", "{cfg}", "--overwrite", *o], code, names)
        for name, o, code, names in (
            ("bad-record", ["data.train={data}/dupkey.jsonl"], 1, ["dupkey.jsonl:2"]),
            ("empty-data", ["data.train={data}/empty.jsonl"], 1, ["no training examples"]),
            ("effective-batch", ["train.effective_batch=6"], 2, ["train.effective_batch"]),
            ("init-from-missing", ["model.init_from={tmp}/nothing"], 1, ["model.init_from"]),
            (
                "init-from-other-arch",
                ["model.init_from={run}/checkpoint-1", "model.tiny.num_layers=3"],
                1,
                ["model.tiny.num_layers"],
            ),
            ("unknown-data", ["data.train=gsm9k"], 1, ["gsm9k"]),
            (
                "epochs-too-many-steps",
                ["train.max_steps=0", "train.epochs=9000", "limits.max_steps=1000"],
                2,
                ["train.epochs", "limits.max_steps"],
            ),
        )
    ],
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
    assert (work["tmp"] / "afile").read_text() == "a user's file\n"
    assert all(p.read_text() == "not kava's\n" for p in work["tmp"].glob("outside-*"))  # no link written through


def test_the_command_itself_exits_with_one_line(work):
    """The same through a real process (a command that needs no torch, to stay quick): its exit
    status and stderr, no traceback."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kava.cli", "config", "--show", str(work["data"] / "dup.yaml")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work["tmp"],
        timeout=300,
    )
    assert proc.returncode == 2
    assert "dup.yaml:3" in _one_error_line(proc.stderr)


def test_an_overwrite_that_cannot_start_keeps_the_old_run_and_one_that_can_replaces_it(work, capsys):
    """The positive control of the overwrite rows: the same command with good inputs deletes the
    old run (so the rows above did stop before deleting, not because nothing would be deleted)."""
    before = _snapshot(work["run"])
    got, _ = _kava(["train", "--config", work["cfg"], "--overwrite", "data.train=gsm9k"], capsys)
    assert got == 1 and _snapshot(work["run"]) == before
    got, _ = _kava(["train", "--config", work["cfg"], "--overwrite", "train.max_steps=1"], capsys)
    assert got == 0 and not (work["run"] / "checkpoint-2").exists()


def test_a_bound_is_raised_by_the_user(work, capsys):
    cfg = work["cfg"]
    got, err = _kava(["config", "--show", cfg, "eval.batch_size=5000"], capsys)
    assert got == 2 and "limits.max_batch_size=4,096" in _one_error_line(err)
    got, _ = _kava(["config", "--show", cfg, "eval.batch_size=5000", "limits.max_batch_size=8192"], capsys)
    assert got == 0


def test_a_failed_resume_of_a_finished_run_leaves_its_status(work, capsys, monkeypatch):
    import kava.training.loop as loop

    status = (work["run"] / "status.json").read_text()
    assert json.loads(status)["state"] == "finished"

    def boom(run, out):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(loop, "evaluate_model", boom)
    with pytest.raises(RuntimeError, match="evaluation exploded"):
        main(["train", "--config", str(work["cfg"]), "--resume", "train.eval_at_end=true"])
    assert (work["run"] / "status.json").read_text() == status


def test_a_lock_planted_as_a_link_never_has_its_target_truncated(work):
    target = work["tmp"] / "precious.txt"
    target.write_text("keep me\n")
    (work["run"] / LOCK_FILE).unlink(missing_ok=True)
    os.symlink(target, work["run"] / LOCK_FILE)
    from kava.training.rundir import RunFolderError

    with pytest.raises(RunFolderError, match="lock"):
        RunLock(work["run"]).acquire()
    assert target.read_text() == "keep me\n"


def test_metrics_are_never_appended_through_a_link(tmp_path):
    import kava.io as kio

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    os.symlink(target, tmp_path / "metrics.jsonl")
    with pytest.raises(OSError):
        kio.append_line(tmp_path / "metrics.jsonl", '{"step": 1}')
    assert target.read_text() == "keep me\n"


# --- kava export never overwrites what it did not write -----------------------------------------


@pytest.mark.parametrize(
    "where,names",
    [
        ("{run}", ["inside the checkpoint"]),
        ("{run}/checkpoint-2", ["inside the checkpoint"]),
        ("{run}/checkpoint-2/sub", ["inside the checkpoint"]),
        ("{tmp}/afile", ["a file"]),
        ("{tmp}/dangling", ["dangling"]),
        ("{tmp}/mine", ["not empty", "notes.txt", "--replace"]),
    ],
    ids=["run-folder", "checkpoint", "inside-checkpoint", "a-file", "dangling-link", "non-empty"],
)
def test_export_refuses_an_out_it_may_not_write(where, names, work, capsys):
    (work["tmp"] / "mine").mkdir()
    (work["tmp"] / "mine" / "notes.txt").write_text("mine")
    before = _snapshot(work["tmp"])
    got, err = _kava(["export", work["run"], "--out", where.format(**work)], capsys)
    line = _one_error_line(err)
    assert got == 1 and all(n in line for n in names), line
    assert _snapshot(work["tmp"]) == before


def test_export_replace_replaces_only_an_earlier_export(work, capsys):
    out = work["tmp"] / "exported"
    assert _kava(["export", work["run"], "--out", out], capsys)[0] == 0
    got, err = _kava(["export", work["run"], "--out", out], capsys)
    assert got == 1 and "--replace" in _one_error_line(err)
    assert _kava(["export", work["run"], "--out", out, "--replace"], capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    got, err = _kava(["export", work["run"], "--out", out, "--replace"], capsys)
    assert got == 1 and "notes.txt" in _one_error_line(err) and (out / "notes.txt").read_text() == "mine"


def test_report_on_a_folder_without_runs_writes_nothing(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    got, err = _kava(["report", tmp_path / "runs"], capsys)
    assert got == 1 and "no run folders" in _one_error_line(err)
    assert list((tmp_path / "runs").iterdir()) == []


def test_data_export_writes_nothing_on_a_bad_record(work, capsys):
    got, err = _kava(["data", "export", work["data"] / "surrogate.jsonl", "--out", work["tmp"] / "o.jsonl"], capsys)
    assert got == 1 and "surrogate" in _one_error_line(err)
    assert not list(work["tmp"].glob("*o.jsonl*"))


# --- every config field, fed values of the wrong type or out of range --------------------------


def _leaf_fields(cls, prefix=""):
    """(dotted name, type) of every field of the config dataclasses, recursively."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _wrong_values(tp, rng):
    """YAML texts of the wrong type for ``tp`` (each must be refused), and of the right type
    but random size (each may be accepted or refused, in one line)."""
    import typing

    mapping, nested = "{a: 1}", "[[1, 2], {b: 3}]"
    if tp is bool:
        wrong = [str(rng.randint(-5, 5)), "maybe", "[true]", mapping, "1.5"]
    elif tp is int:
        wrong = ["abc", "[1]", mapping, "true", f"{rng.random() + 0.5:.3f}", "1e9", "''", "null"]
    elif tp is float:
        wrong = ["abc", "[1.0]", mapping, "false", ".nan", "-.inf", "null"]
    elif tp is str:
        wrong = ["[1, 2]", mapping, "true", nested]
    elif typing.get_origin(tp) is list or tp is list:
        wrong = (
            [mapping, "true", str(rng.randint(-9, 9))]
            if not typing.get_args(tp)
            else [mapping, "[1, 2]", "abc", "[[1]]"]
        )
    else:
        wrong = [mapping]
    big = [
        str(rng.choice([-1, 1]) * 10 ** rng.randint(1, 40)),
        str(-rng.randint(1, 10**6)),
        "0",
        f"{rng.uniform(-1e300, 1e300):.6g}",
        repr("x" * rng.randint(0, 3000)),
    ]
    return wrong, big


def test_every_config_field_refuses_wrong_values_in_one_line(work, capsys):
    """Property-style: random values of the wrong type for every field of every config section,
    and random out-of-range ones, through `kava config --show FILE KEY=VALUE` (the same load and
    checks as every command): a wrong type is refused naming the field; any other value is either
    accepted or refused in one line; never a traceback."""
    import random

    from kava.config import KavaConfig

    rng = random.Random(28)
    fields = list(_leaf_fields(KavaConfig))
    assert len(fields) > 120 and "limits.max_batch_size" in dict(fields)
    tried = refused = 0
    for name, tp in fields:
        wrong, big = _wrong_values(tp, rng)
        for value in wrong:
            got, err = _kava(["config", "--show", work["cfg"], f"{name}={value}"], capsys)
            line = _one_error_line(err)
            assert got == 2 and name.split("[")[0] in line, (name, value, line)
            tried += 1
        for value in big:
            got, err = _kava(["config", "--show", work["cfg"], f"{name}={value}"], capsys)
            assert got in (0, 2), (name, value, err)
            if got == 2:
                _one_error_line(err)
                refused += 1
            tried += 1
    assert tried > 1000 and refused > 100  # (the bounds are exercised, not only the types)


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
    (code / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForCausalLM": "evil.EvilModel",
                    "AutoTokenizer": ["evil.EvilTokenizer", None],
                },
            }
        )
    )
    (code / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\nraise SystemExit('evil code ran')\n"
    )
    ckpt = tmp_path / "ckpt"  # a LoRA checkpoint: its base is the model folder above
    ckpt.mkdir()
    build_synthetic_tokenizer().save_pretrained(ckpt)
    cfg = tiny_config(model={"name_or_path": str(code), "trust_remote_code": True, "adapter": "lora"}).to_dict()
    (ckpt / "kava_config.yaml").write_text(yaml.safe_dump(cfg))
    (ckpt / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(code)}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(1)}, str(ckpt / "adapter_model.safetensors"))
    small = tmp_path / "small.yaml"  # a small run, so that the teacher is reached quickly
    small.write_text(yaml.safe_dump(tiny_config().to_dict()))
    return {"code": code, "ckpt": ckpt, "ran": ran, "tmp": tmp_path, "cfg": small}


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "--checkpoint", "{ckpt}"],
        ["eval", "--checkpoint", "{ckpt}", "model.trust_remote_code=false"],
        [
            "train",
            "--config",
            "{cfg}",
            "model.init_from={ckpt}",
            "model.name_or_path={code}",
            "train.output_dir={tmp}/r1",
        ],
        ["train", "--config", "{cfg}", "teachers.models=[{{name_or_path: {ckpt}}}]", "train.output_dir={tmp}/r2"],
        ["export", "{ckpt}", "--out", "{tmp}/exported"],
    ],
    ids=["eval", "eval-explicit-false", "init_from", "teachers", "export"],
)
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
    from kava.model.files import ModelLoadError

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
    assert (
        status["state"] == "failed"
        and "non-finite weights" in status["error"]
        and status["checkpoint"].endswith("checkpoint-1")
    )


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
        kio.atomic_replace_dir(
            tmp_path / "checkpoint-1", lambda t: (t / "tokenizer").mkdir() or (t / WEIGHTS_FILE).write_bytes(b"w")
        )
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
    (d / "config.yaml").write_text(
        yaml.safe_dump({"data": {"train": "synthetic", "eval": "synthetic"}, "train": {"seed": seed}})
    )
    (d / "eval_metrics.json").write_text(json.dumps({"student": {"n": 10, "accuracy": acc, "forward_passes": 6.0}}))
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    return d


@pytest.mark.parametrize(
    "file,content,names",
    [
        ("config.yaml", "data: [unclosed\n", ["config.yaml:2"]),
        ("status.json", "{not json", ["status.json"]),
        ("eval_metrics.json", '{"student": 0.5}', ["eval_metrics.json"]),
        ("metrics.jsonl", '{"step": 1}\n{oops\n{"step": 2}\n', ["metrics.jsonl:2"]),
    ],
    ids=["config", "status", "eval_metrics", "metrics-middle-line"],
)
def test_report_skips_a_run_with_a_malformed_file_and_writes_the_rest(file, content, names, tmp_path, capsys, caplog):
    good = _report_run(tmp_path / "runs", "rkv", 0, 0.9)
    bad = _report_run(tmp_path / "runs", "codi", 0, 0.4)
    (bad / file).write_text(content)
    with caplog.at_level(logging.WARNING):
        got, err = _kava(["report", tmp_path / "runs", "--out", tmp_path / "rep"], capsys)
    assert got == 0 and "Traceback" not in err
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "skipping run" in r.getMessage()
    ]
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
    cfg.write_text(
        yaml.safe_dump(
            tiny_config(
                loss={"teacher_ce": 0.0, "teacher_cache": str(copy)},
                data={"train_limit": 8},
                train={"output_dir": str(tmp_path / "r")},
            ).to_dict()
        )
    )
    got, err = _kava(["train", "--config", cfg], capsys)
    assert got == 2 and str(shard) in _one_error_line(err)
    status = json.loads((tmp_path / "r" / "status.json").read_text())  # stopped before the run started: it says why
    assert status["state"] == "failed" and status["step"] == 0 and status["checkpoint"] is None


def test_training_from_a_cache_with_eval_at_end_skips_the_kv_probe(cache, tmp_path, caplog):
    """The cache holds training examples only; the live teacher is not what the student was
    distilled towards, so the probe is skipped with a note and the evaluation still runs."""
    cfg = tiny_config(
        loss={"teacher_ce": 0.0, "teacher_cache": str(cache)},
        data={"train_limit": 8},
        train={"output_dir": str(tmp_path / "r"), "max_steps": 2, "eval_at_end": True},
    )
    with caplog.at_level(logging.INFO):
        res = train(cfg)
    assert res["state"] == "finished" and res["eval"]["student"]["n"] == 16
    assert not (tmp_path / "r" / "kv_cosine.json").exists()
    notes = [r.getMessage() for r in caplog.records if "kv probe skipped" in r.getMessage()]
    assert len(notes) == 1 and len(notes[0].splitlines()) == 1


def test_ctrl_c_outside_a_training_loop_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import kava.data

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(kava.data, "load_examples_report", interrupted)
    code, err = _kava(["data", "export", "synthetic?n=2", "--out", tmp_path / "o.jsonl"], capsys)
    assert code == 130 and "interrupted" in _one_error_line(err)
    assert list(tmp_path.iterdir()) == []


# --- weights of the wrong kind, and an empty model name ------------------------------------------


def test_integer_weights_are_refused_not_cast(tmp_path, capsys):
    from kava.model import build_model, save_checkpoint

    cfg = tiny_config(model={"adapter": "full"})
    save_checkpoint(build_model(cfg), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    name = next(n for n in sorted(state) if n.endswith("mlp.up_proj.weight"))
    state[name] = state[name].round().to(torch.int64)
    save_file(state, weights)
    assert main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--limit", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(weights) in err[0] and name in err[0] and "I64" in err[0], err


def test_check_shapes_refuses_integer_values_for_float_weights(tmp_path):
    from kava.model.files import ModelLoadError, check_shapes

    module = torch.nn.Linear(2, 2)
    check_shapes(module, {"weight": torch.zeros(2, 2)}, tmp_path / "w")
    with pytest.raises(ModelLoadError, match=r"'bias' holds int32 values where the model has float32 weights"):
        check_shapes(module, {"bias": torch.zeros(2, dtype=torch.int32)}, tmp_path / "w")


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_model_name_is_a_config_error(name, capsys):
    from kava.config import ConfigError

    with pytest.raises(ConfigError, match="model.name_or_path.*empty"):
        tiny_config(model={"name_or_path": name})
    assert main(["config", "--show", f"model.name_or_path={name}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.name_or_path" in err[0], err

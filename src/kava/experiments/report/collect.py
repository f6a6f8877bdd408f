"""Reading run folders: one record per run from its ``status.json``, ``config.yaml``,
``eval_metrics.json``, ``metrics.jsonl``, ``instruments.jsonl``, ``selector_keeps.json`` and the
evaluations during training (``eval-<step>/``); or the records an earlier report kept in its
``runs.csv``. A malformed file raises :class:`RunFileError` naming it."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import yaml

log = logging.getLogger("kava.report")  # the name its log lines have always had

_SEED_DIR = re.compile(r"seed(\d+)")
RUNS_CSV_FIELDS = [
    "name",
    "seed",
    "dataset",
    "state",
    "step",
    "max_steps",
    "mode",
    "accuracy",
    "forward_passes",
    "final_loss",
    "error",
    "path",
]


class RunFileError(ValueError):
    """A malformed file in a run folder; the message names the file (and line). Collecting
    skips that run with a warning and goes on with the others."""


def _read_json(path: Path) -> dict | None:
    """A run file holding one JSON object, or None where there is none."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError names the line and column
        raise RunFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RunFileError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict) for k in ("data", "train")):
        raise RunFileError(f"{path}: expected a kava config (a mapping with data and train sections)")
    return config


def read_history(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` by step; where a resumed run logged a step twice, the last row wins.

    A torn last line (no newline, not valid JSON: a crash or a full disk mid-append) is
    skipped with a warning; any other bad line raises :class:`RunFileError` naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")  # a whole file ends in "\n": its last piece is empty
    by_step: dict[int, dict] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise ValueError("expected an object with an integer 'step'")
        except ValueError as e:
            if lineno == len(lines):  # the last line, without its newline
                log.warning("%s:%d: skipped a torn last line (%s)", path, lineno, e)
                continue
            raise RunFileError(f"{path}:{lineno}: not a metrics row ({e})") from None
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def read_instruments(run_dir: str | Path) -> list[dict]:
    """The rows of ``instruments.jsonl`` by step (see :mod:`kava.distill.instruments`); the last
    row of a step logged twice (a resumed run) wins."""
    path = Path(run_dir) / "instruments.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                by_step[int(row["step"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not an instruments row ({e})") from None
    return [by_step[s] for s in sorted(by_step)]


def dataset_label(train_data: str, eval_data: str) -> str:
    """``eval`` when it is the training data's name too, else ``train→eval``."""
    return eval_data if train_data == eval_data or not train_data else f"{train_data}→{eval_data}"


def method_of(name: str) -> str:
    """The method a run name stands for: the part before an ``@``."""
    return name.split("@", 1)[0]


def collect_runs(runs_dir: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """One record per run folder under ``runs_dir`` (any folder with a ``status.json``).

    Keys: name, method, seed, path, state, step, max_steps, error, train_data, eval_data,
    dataset, mode (train.mode), config (the raw ``config.yaml`` mapping), eval
    (``{mode: metrics}`` from ``eval_metrics.json``, else from ``status.json``),
    last_metrics (the last ``metrics.jsonl`` row, else ``status["train"]``), instruments (the
    ``instruments.jsonl`` rows) and selector_keeps (``selector_keeps.json``, or None).

    A run folder with a malformed ``status.json``, ``config.yaml``, ``eval_metrics.json`` or
    ``metrics.jsonl`` is skipped with a warning naming the file (and line), added to
    ``skipped`` when given; the other runs are collected.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    records = []
    for status_path in sorted(root.rglob("status.json")):
        run_dir = status_path.parent
        rel = run_dir.relative_to(root)
        if any(part.startswith(".") or part.startswith("checkpoint-") for part in rel.parts):
            continue
        try:
            records.append(_collect_run(root, run_dir, rel, status_path))
        except RunFileError as e:
            log.warning("skipping run %s: %s", run_dir, e)
            if skipped is not None:
                skipped.append(str(e))
    return records


def _collect_run(root: Path, run_dir: Path, rel: Path, status_path: Path) -> dict:
    """One run's record (see :func:`collect_runs`)."""
    status = _read_json(status_path) or {}
    config = _read_config(run_dir / "config.yaml")
    evals = _read_json(run_dir / "eval_metrics.json") or status.get("eval") or {}
    if not isinstance(evals, dict) or not all(isinstance(m, dict) for m in evals.values()):
        raise RunFileError(f"{run_dir / 'eval_metrics.json'}: expected {{mode: {{metric: value}}}}")
    seed_match = _SEED_DIR.fullmatch(run_dir.name)
    if seed_match and rel.parent.parts:
        name, seed = rel.parent.as_posix(), int(seed_match.group(1))
    else:
        name = rel.as_posix() if rel.parts else root.resolve().name
        seed = config.get("train", {}).get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RunFileError(f"{run_dir / 'config.yaml'}: train.seed is {seed!r}, not an integer")
    data = config.get("data", {})
    train_data, eval_data = str(data.get("train", "")), str(data.get("eval", "unknown"))
    history = read_history(run_dir)
    curves = read_eval_curves(run_dir, evals, status.get("step"))
    return {
        "name": name,
        "method": method_of(name),
        "seed": seed,
        "path": str(run_dir),
        "state": status.get("state", "unknown"),
        "step": status.get("step"),
        "max_steps": status.get("max_steps"),
        "error": status.get("error", ""),
        "train_data": train_data,
        "eval_data": eval_data,
        "dataset": dataset_label(train_data, eval_data),
        "mode": config.get("train", {}).get("mode", ""),
        "config": config,
        "eval": evals,
        "last_metrics": history[-1] if history else status.get("train") or {},
        "instruments": read_instruments(run_dir),
        "selector_keeps": _read_json(run_dir / "selector_keeps.json"),
        "curves": curves,
    }


def read_eval_curves(run_dir: Path, final: dict, final_step: int | None) -> dict[str, list[tuple[int, float]]]:
    """``{mode: [(step, accuracy), ...]}``: the evaluations during training (``eval-<step>/``) and, at
    the run's last step, the final one, in step order."""
    curves: dict[str, dict[int, float]] = {}
    for d in run_dir.glob("eval-*"):
        m = re.fullmatch(r"eval-(\d+)", d.name)
        ev = _read_json(d / "eval_metrics.json") if m and d.is_dir() else None
        for mode, metrics in (ev or {}).items():
            if isinstance(metrics, dict) and isinstance(metrics.get("accuracy"), (int, float)):
                curves.setdefault(mode, {})[int(m.group(1))] = float(metrics["accuracy"])
    if isinstance(final_step, int):
        for mode, metrics in final.items():
            if isinstance(metrics.get("accuracy"), (int, float)):
                curves.setdefault(mode, {})[final_step] = float(metrics["accuracy"])
    return {mode: sorted(points.items()) for mode, points in curves.items()}


def collect_runs_csv(path: str | Path) -> list[dict]:
    """The run records (as :func:`collect_runs` gives them) held in a report's ``runs.csv``: name,
    seed, dataset, state, step, accuracy and forward passes per eval mode, the final loss. What
    only the run folders hold (configs, instruments, loss curves) is absent. A malformed row raises
    :class:`RunFileError` naming the file, line and field."""
    # Kept whole (over 60 lines): one row of runs.csv checked field by field, in column order.
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RunFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(lines)
    missing = [f for f in RUNS_CSV_FIELDS if f not in (reader.fieldnames or [])]
    if missing:
        raise RunFileError(f"{path}:1: not a kava report's runs.csv (no column {', '.join(missing)})")

    def number(row: dict, key: str, line: int, kind=float):
        text = row[key]
        if text in ("", "None"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise RunFileError(f"{path}:{line}: {key} is {text!r}, not a number") from None

    runs: dict[tuple, dict] = {}
    for line, row in enumerate(reader, start=2):
        if None in row.values():
            raise RunFileError(f"{path}:{line}: expected {len(RUNS_CSV_FIELDS)} fields")
        seed = number(row, "seed", line, int)
        key = (row["name"], seed, row["dataset"], row["path"])
        train_data, _, eval_data = row["dataset"].partition("→")
        run = runs.setdefault(
            key,
            {
                "name": row["name"],
                "method": method_of(row["name"]),
                "seed": seed,
                "path": row["path"],
                "state": row["state"],
                "step": number(row, "step", line, int),
                "max_steps": number(row, "max_steps", line, int),
                "error": row["error"],
                "train_data": train_data,
                "eval_data": eval_data or train_data,
                "dataset": row["dataset"],
                "mode": "",
                "config": {},
                "eval": {},
                "last_metrics": {},
                "instruments": [],
                "selector_keeps": None,
            },
        )
        if number(row, "final_loss", line) is not None:
            run["last_metrics"] = {"loss": number(row, "final_loss", line)}
        if row["mode"]:
            run["eval"][row["mode"]] = {
                "accuracy": number(row, "accuracy", line),
                "forward_passes": number(row, "forward_passes", line),
            }
    return list(runs.values())

"""What every config section is made of: fields with help text (:func:`_f`), the one error a
bad value raises (:class:`ConfigError`, naming the field), the checks that raise it, where output
folders go, and which fields a resume may change."""

from __future__ import annotations

import os
import typing
from dataclasses import field
from pathlib import Path
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


OUTPUT_ROOT_ENV = "KAVA_OUTPUT_ROOT"

# What a resume may change: where the run is, how it logs, saves and evaluates, what it
# evaluates on. None of them changes the weights a step computes. A field ending in "." is a
# section (every field of it). train.max_steps and train.epochs may change too under a constant
# schedule whose warm-up keeps its number of steps (RESUME_STEP_COUNT). Checked by
# kava.training.rundir.check_resume_config.
RESUME_MAY_CHANGE = (
    "train.output_dir",
    "train.output_root",
    "train.overwrite_output_dir",
    "train.num_threads",
    "train.log_every",
    "train.save_every",
    "train.eval_every",
    "train.eval_at_end",
    "train.progress",
    "train.report_to",
    "train.project",
    "train.run_name",
    "train.save_total_limit",
    "model.cache_dir",
    "data.cache_dir",
    "data.eval",
    "data.eval_split",
    "data.eval_limit",
    "eval.",
)
RESUME_STEP_COUNT = ("train.max_steps", "train.epochs")


def under_output_root(path: str | Path, root: str = "") -> Path:
    """Where an output folder goes: ``path`` itself when absolute; else under ``root`` (a config's
    ``train.output_root``), else under ``$KAVA_OUTPUT_ROOT``, else the current directory. The
    config wins over the environment, the environment over the default."""
    path = Path(path).expanduser()
    base = root or os.environ.get(OUTPUT_ROOT_ENV, "")
    return path if path.is_absolute() or not base else Path(base).expanduser() / path


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config field '{name}': {msg}")


def _choice(value: Any, name: str, choices: typing.Iterable[Any]) -> None:
    choices = tuple(choices)
    _check(value in choices, name, f"{value!r} is not one of {', '.join(map(str, choices))}")

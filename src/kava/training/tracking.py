"""Experiment trackers (``train.report_to``) through accelerate's trackers.

:func:`tracker_names` reads the config and checks, before anything is loaded, that each
tracker's package imports; a missing one is a one-line :class:`~kava.config.ConfigError`
naming the package and its install command (accelerate itself would drop it silently).
:func:`start_trackers` opens them in the run folder with the resolved config and the run's
summary as hyper-parameters; the training loop then logs each ``metrics.jsonl`` row to them
with ``accelerator.log`` and closes them with ``accelerator.end_training``.

Where they write: TensorBoard ``RUN/logs/<train.project>/``; wandb ``RUN/wandb/`` (offline
with ``WANDB_MODE=offline``); MLflow wherever ``MLFLOW_TRACKING_URI`` points (its default).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..config import ConfigError, KavaConfig

# tracker name -> (module that must import, pip install command)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def tracker_names(cfg: KavaConfig) -> list[str]:
    """The trackers a run reports to (``train.report_to``), each checked to import."""
    tc = cfg.train
    names = [n.strip() for n in tc.report_to.split(",") if n.strip() not in ("", "none")]
    for name in names:
        module, install = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(
                f"config field 'train.report_to': {name} needs the package '{module}', "
                f"which is not installed: {install}"
            ) from None
    return list(dict.fromkeys(names))


def flat_config(cfg: KavaConfig) -> dict[str, Any]:
    """The resolved config as ``section.key`` -> bool/int/float/str (lists and dicts as text),
    which every tracker accepts as hyper-parameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = str(value)

    walk("", cfg.to_dict())
    return out


def start_trackers(accelerator, cfg: KavaConfig, out: Path, summary: dict) -> None:
    """Open the accelerator's trackers (a no-op without any) for the run in ``out``."""
    if not accelerator.log_with:
        return
    tc = cfg.train
    run_name = tc.run_name or out.resolve().name
    hparams = {
        **flat_config(cfg),
        **{f"run.{k}": v for k, v in summary.items() if isinstance(v, (bool, int, float, str))},
    }
    accelerator.init_trackers(
        tc.project,
        config=hparams,
        init_kwargs={
            "wandb": {"name": run_name, "dir": str(out)},
            "mlflow": {"run_name": run_name},
        },
    )

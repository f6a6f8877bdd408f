"""Sweeps on a cluster: the unfinished runs of a sweep as one SLURM job array through submitit
(:func:`submit_slurm`; each job is :class:`SweepJob`, requeued on preemption) or as a PBS
job-array script (:func:`write_pbs`). Each job runs one spec with :func:`run_spec`."""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .sweep import (
    RunSpec,
    SweepError,
    TrainFn,
    _default_train,
    plan,
    read_status,
    record_failure,
    safe_name,
    validate_specs,
)

try:  # optional: the ``cluster`` extra
    import submitit.helpers as _submitit_helpers
except ImportError:
    _submitit_helpers = None

_Checkpointable: type = _submitit_helpers.Checkpointable if _submitit_helpers is not None else object
log = logging.getLogger("kava.sweep")


# --- SLURM (submitit) -------------------------------------------------------------------


def run_spec(spec: RunSpec, resume: bool = True, train_fn: TrainFn | None = None) -> dict:
    """Run one spec (the body of a cluster job): skip it if finished, record a crash, re-raise it."""
    status = read_status(spec.output_dir)
    if resume and status is not None and status.get("state") == "finished":
        log.info("%s/seed%d already finished", spec.name, spec.seed)
        return status
    cfg = spec.config()
    try:
        return (train_fn or _default_train())(cfg, resume=resume)
    except Exception as e:  # the job fails (re-raised) but the run folder says why
        record_failure(spec, e)
        raise


def _submitit() -> Any:
    if _submitit_helpers is None:
        raise SweepError("cluster submission needs submitit: pip install submitit")
    import submitit

    return submitit


class SweepJob(_Checkpointable):
    """A picklable, checkpointable job callable: ``SweepJob(train_fn)(spec)`` trains one run.

    On pre-emption or time-out submitit calls ``job.checkpoint(spec)``, which re-queues the
    same run with ``resume=True``: it continues from its latest ``checkpoint-N`` folder (set
    ``train.save_every`` so that little is lost). Needs submitit for the re-queueing.
    """

    def __init__(self, train_fn: TrainFn | None = None):
        self.train_fn = train_fn

    def __call__(self, spec: RunSpec, resume: bool = True) -> dict:
        return run_spec(spec, resume=resume, train_fn=self.train_fn)

    def checkpoint(self, spec: RunSpec, resume: bool = True) -> Any:
        """The same run again, resumed from its latest checkpoint."""
        return _submitit().helpers.DelayedSubmission(SweepJob(self.train_fn), spec, True)


def _sweep_root(specs: Sequence[RunSpec]) -> Path:
    return specs[0].output_dir.parent.parent if specs else Path("runs")


def submit_slurm(
    specs: Sequence[RunSpec],
    partition: str = "",
    gpus_per_job: int = 1,
    time_min: int = 600,
    cpus: int = 8,
    mem_gb: int = 64,
    array_parallelism: int = 64,
    executor: str = "slurm",
    log_dir: str | Path | None = None,
    resume: bool = True,
    train_fn: TrainFn | None = None,
    extra: dict | None = None,
) -> list:
    """Submit the unfinished runs as one job array through submitit; returns the jobs.

    ``executor``: ``slurm`` (a cluster), ``local`` (subprocesses here) or ``debug`` (in this
    process, for tests). Jobs are checkpointable (see :class:`SweepJob`). Submitit's logs go
    to ``log_dir`` (default ``<sweep output_dir>/slurm_logs``). ``extra`` goes to
    ``update_parameters`` as is (e.g. ``{"slurm_account": "abc"}``).
    """
    if executor not in ("slurm", "local", "debug"):
        raise SweepError(f"executor must be slurm, local or debug, got {executor!r}")
    submitit = _submitit()
    todo = [spec for spec, action in plan(specs, resume) if action != "skip"]
    validate_specs(todo)
    if not todo:
        log.info("every run is finished: nothing to submit")
        return []
    folder = Path(log_dir) if log_dir else _sweep_root(specs) / "slurm_logs"
    ex = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=executor)
    params: dict[str, Any] = {
        "name": f"kava-{_sweep_root(specs).name}",
        "timeout_min": time_min,
        "gpus_per_node": gpus_per_job,
        "cpus_per_task": cpus,
        "mem_gb": mem_gb,
        "nodes": 1,
        "tasks_per_node": 1,
        "slurm_array_parallelism": array_parallelism,
    }
    if partition:
        params["slurm_partition"] = partition
    params.update(extra or {})
    ex.update_parameters(**params)
    jobs = ex.map_array(SweepJob(train_fn), todo, [resume] * len(todo))
    for spec, j in zip(todo, jobs):
        log.info("submitted %s/seed%d as job %s", spec.name, spec.seed, j.job_id)
    return jobs


# --- PBS --------------------------------------------------------------------------------


def _walltime(walltime: str | int) -> str:
    if isinstance(walltime, int) and not isinstance(walltime, bool):
        return f"{walltime // 60:02d}:{walltime % 60:02d}:00"
    if not re.fullmatch(r"\d+:\d{2}:\d{2}", str(walltime)):
        raise SweepError(f"walltime must be minutes or HH:MM:SS, got {walltime!r}")
    return str(walltime)


def write_pbs(
    specs: Sequence[RunSpec],
    out_dir: str | Path,
    queue: str = "",
    gpus: int = 1,
    walltime: str | int = "10:00:00",
    cpus: int = 8,
    mem_gb: int = 64,
    kava_cmd: str = "kava",
    setup: str = "",
    resume: bool = True,
) -> Path:
    """Write one PBS job-array script for the unfinished runs; returns its path.

    Each run's resolved config (with an absolute ``train.output_dir``) is saved first as
    ``<run folder>/config.yaml``; array index i runs ``kava train --config <config of run i>
    --resume``. ``setup`` is shell text placed before it (e.g. ``source .venv/bin/activate``).
    A single run gets no ``-J`` line. Submit with ``qsub <script>``.
    """
    todo = [spec for spec, action in plan(specs, resume) if action != "skip"]
    configs = validate_specs(todo)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec, cfg in zip(todo, configs):
        cfg.train.output_dir = str(spec.output_dir.resolve())  # the job may start in another directory
        path = spec.output_dir.resolve() / "config.yaml"
        cfg.save(path)
        paths.append(path)
    name = safe_name(f"kava-{_sweep_root(specs).name}")[:15]
    lines = ["#!/bin/bash", f"#PBS -N {name}"]
    if len(todo) > 1:
        lines.append(f"#PBS -J 0-{len(todo) - 1}")
    select = f"select=1:ncpus={cpus}:mem={mem_gb}gb" + (f":ngpus={gpus}" if gpus > 0 else "")
    lines += [f"#PBS -l {select}", f"#PBS -l walltime={_walltime(walltime)}"]
    if queue:
        lines.append(f"#PBS -q {queue}")
    lines += [
        f"#PBS -o {shlex.quote(str(out_dir.resolve()))}/",
        "#PBS -j oe",
        "",
        "set -euo pipefail",
        'cd "${PBS_O_WORKDIR:-.}"',
    ]
    if setup:
        lines += ["", setup.rstrip()]
    lines += ["", "# index: run"]
    lines += [f"#   {i}: {spec.name}/seed{spec.seed}" for i, spec in enumerate(todo)]
    lines.append("CONFIGS=(")
    lines += [f"  {shlex.quote(str(p))}" for p in paths]
    lines += [")", "", f'exec {kava_cmd} train --config "${{CONFIGS[${{PBS_ARRAY_INDEX:-0}}]}}" --resume', ""]
    script = out_dir / "sweep.pbs"
    atomic_write_text(script, "\n".join(lines))
    script.chmod(0o755)
    log.info("wrote %s for %d run(s): submit with qsub %s", script, len(todo), script)
    return script


__all__ = ["SweepJob", "run_spec", "submit_slurm", "write_pbs"]

"""Sweeps: many training runs from one YAML file, run locally here, on SLURM or on PBS
(:mod:`kava.experiments.cluster`).

A sweep file looks like this (every key but ``base_config`` is optional)::

    base_config: ../curriculum/kava.yaml      # relative to the sweep file
    output_dir: runs/ablations          # run folders: <output_dir>/<name>/seed<seed>
    seeds: [0, 1, 2]                    # train.seed of each copy (default: [0])
    overrides: {train.max_steps: 200}   # applied to every run
    runs:                               # named variants
      codi: {loss.alpha_kv: 0}
      rkv: {loss.compression: rkv, seeds: [0, 1, 2, 3, 4]}   # a run may have its own seeds
      rkv@nl: {data.train: synthetic-nl, data.eval: synthetic-nl}
    grid:                               # cartesian product, crossed with every named run
      latent.num_latents: [4, 8]

Keys are dotted config fields (``section.key``); a nested mapping (``loss: {alpha_kv: 0}``)
means the same; ``seeds`` inside a named run replaces the sweep's seeds for that run. Precedence:
base config < ``overrides`` < the run's own values < the grid point < ``extra`` overrides (``kava
sweep --set``) < the seed and output folder set by the sweep.

Run names are stable and filesystem-safe: the named run, then ``key-value`` for each grid
key (in file order, the last part of the key unless two grid keys share it) joined by
``__``. Grid keys of the ``data`` section go after an ``@``: the report reads the part
before the ``@`` as the method and the config's data as the dataset, so ``rkv@nl`` and
``rkv`` are one method on two datasets.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, KavaConfig, config_from_dict, load_config, read_yaml, under_output_root
from ..io import atomic_write_json

try:  # optional: the ``cluster`` extra
    import submitit.helpers as _submitit_helpers
except ImportError:
    _submitit_helpers = None
_Checkpointable: type = _submitit_helpers.Checkpointable if _submitit_helpers is not None else object

log = logging.getLogger("kava.sweep")  # the name its log lines have always had

TrainFn = Callable[..., dict]
"""``train_fn(cfg, resume=...) -> result``, like :func:`kava.training.train`."""

_SWEEP_KEYS = ("base_config", "output_dir", "seeds", "grid", "runs", "overrides")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")
MAX_SWEEP_RUNS = 100_000  # runs one sweep file may expand to


class SweepError(ValueError):
    """A bad sweep file or an unsafe sweep action; the message says which."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep.

    ``overrides`` is the complete ``key=value`` list applied on top of ``base_config``
    (it ends with ``train.seed`` and ``train.output_dir``), so
    ``kava train --config BASE OVERRIDES...`` reproduces the run.
    """

    name: str
    seed: int
    overrides: tuple[str, ...]
    output_dir: Path
    base_config: Path
    params: dict = field(default_factory=dict, compare=False, hash=False)
    """The values that make this run differ from the others (its variant and grid point)."""

    def config(self) -> KavaConfig:
        """The resolved configuration (raises :class:`~kava.config.ConfigError` on a bad key)."""
        return load_config(self.base_config, self.overrides)


# --- expansion --------------------------------------------------------------------------


def _flatten(values: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"alpha_kv": 0}}`` and ``{"loss.alpha_kv": 0}`` -> ``{"loss.alpha_kv": 0}``."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SweepError(f"{where}: expected a mapping of config keys to values, got {values!r}")
    out: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, where, full + "."))
        else:
            out[full] = value
    return out


def format_value(value: Any) -> str:
    """A value written so that :func:`kava.config.parse_overrides` reads it back unchanged."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value and "\n" not in value else json.dumps(value)
    return json.dumps(value)


def safe_name(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9._@+-]`` replaced by ``_``."""
    out = _UNSAFE.sub("_", str(text)).strip("._")
    return out or "run"


def _piece(short: str, value: Any) -> str:
    shown = value if isinstance(value, str) else json.dumps(value)
    return safe_name(f"{short}-{shown}")


def _grid_points(grid: dict[str, list]) -> list[tuple[str, dict[str, Any]]]:
    """Every grid point as ``(name, {key: value})``; ``[("", {})]`` for an empty grid."""
    if not grid:
        return [("", {})]
    keys = list(grid)
    lasts = [k.rsplit(".", 1)[-1] for k in keys]
    shorts = [last if lasts.count(last) == 1 else k for k, last in zip(keys, lasts)]
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        plain = [_piece(s, v) for k, v, s in zip(keys, combo, shorts) if not k.startswith("data.")]
        data = [_piece(s, v) for k, v, s in zip(keys, combo, shorts) if k.startswith("data.")]
        name = "__".join(plain) + ("@" + "__".join(data) if data else "")
        points.append((name, dict(zip(keys, combo))))
    return points


def _join(run: str, point: str) -> str:
    if not run:
        return point or "base"
    if not point:
        return run
    if point.startswith("@"):
        return f"{run}{point}" if "@" not in run else f"{run}__{point[1:]}"
    return f"{run}__{point}"


def _seeds(seeds: Any, where: str) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise SweepError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: 'seeds' has duplicates: {seeds}")
    return seeds


def _check_set(extra: Sequence[str]) -> None:
    """``--set`` overrides: each KEY=VALUE, each key once."""
    bad = [e for e in extra if "=" not in e or not e.split("=", 1)[0].strip()]
    if bad:
        raise SweepError(f"--set {bad[0]!r}: expected KEY=VALUE, e.g. train.max_steps=2")
    keys = [e.split("=", 1)[0].strip() for e in extra]
    twice = [k for i, k in enumerate(keys) if k in keys[:i]]
    if twice:
        raise SweepError(f"--set {twice[0]}: given twice; give each key once")


def _check_count(path: Path, count: int) -> None:
    """The runs a sweep expands to, counted before any is built (a grid's product grows fast)."""
    if count > MAX_SWEEP_RUNS:
        raise SweepError(
            f"{path}: {count:,} runs (names x grid points x seeds); a sweep holds at most {MAX_SWEEP_RUNS:,}"
        )


def expand_sweep(
    path: str | Path, validate: bool = False, extra: Sequence[str] = (), output_dir: str | Path | None = None
) -> list[RunSpec]:
    """The runs of the sweep file at ``path``: (named runs x grid points) x seeds.

    ``output_dir`` is taken relative to ``$KAVA_OUTPUT_ROOT``, else the current directory (like
    ``train.output_dir``);
    ``base_config`` relative to the sweep file. With ``validate``, every run's config is
    resolved now, so that a typo fails before any run starts. ``extra``: ``key=value`` overrides
    applied to every run after its own values (a smoke test: ``train.max_steps=2``);
    ``output_dir``: replaces the file's (so that such a test does not mark the real runs finished).
    """
    # Kept whole (over 60 lines): the sweep file's keys in their precedence order, each checked where it is read.
    _check_set(extra)
    path = Path(path)
    data = read_yaml(path)
    unknown = sorted(set(data) - set(_SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; expected {', '.join(_SWEEP_KEYS)}")
    if not data.get("base_config"):
        raise SweepError(f"{path}: 'base_config' is required (a config YAML, relative to the sweep file)")
    base = (path.parent / str(data["base_config"])).resolve()
    out_root = under_output_root(str(output_dir or data.get("output_dir") or f"runs/{safe_name(path.stem)}"))
    seeds = _seeds(data.get("seeds", [0]), str(path))

    common = _flatten(data.get("overrides"), f"{path}: overrides")
    grid = _flatten(data.get("grid"), f"{path}: grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid key '{key}' needs a non-empty list of values, got {values!r}")
    runs_raw = data.get("runs")
    if runs_raw is not None and not isinstance(runs_raw, dict):
        raise SweepError(f"{path}: 'runs' must map run names to override mappings")
    run_seeds: dict[str, list[int]] = {}
    for n, v in (runs_raw or {}).items():
        if isinstance(v, dict) and "seeds" in v:
            v = dict(v)
            run_seeds[safe_name(n)] = _seeds(v.pop("seeds"), f"{path}: runs.{n}")
            runs_raw = {**runs_raw, n: v}
    runs = {safe_name(n): _flatten(v, f"{path}: runs.{n}") for n, v in (runs_raw or {}).items()} or {"": {}}
    _check_count(path, math.prod(len(v) for v in grid.values()) * sum(len(run_seeds.get(n, seeds)) for n in runs))
    if runs_raw and len(runs) != len(runs_raw):
        raise SweepError(f"{path}: run names {list(runs_raw)} collide once made filesystem-safe")

    specs: list[RunSpec] = []
    seen: dict[str, dict] = {}
    for run_name, run_values in runs.items():
        for point_name, point_values in _grid_points(grid):
            name = _join(run_name, point_name)
            params = {**run_values, **point_values}
            if name in seen:
                raise SweepError(f"{path}: two runs are both named '{name}' ({seen[name]} and {params})")
            seen[name] = params
            values = {**common, **params}
            for seed in run_seeds.get(run_name, seeds):
                out = out_root / name / f"seed{seed}"
                layered = [f"{k}={format_value(v)}" for k, v in values.items()] + list(extra)
                layered += [f"train.seed={seed}", f"train.output_dir={format_value(str(out))}"]
                # One entry per key, the last layer's (a config refuses a key given twice).
                by_key = {item.split("=", 1)[0].strip(): item for item in layered}
                specs.append(RunSpec(name, seed, tuple(by_key.values()), out, base, params))
    if validate:
        validate_specs(specs)
    return specs


def validate_specs(specs: Sequence[RunSpec]) -> list[KavaConfig]:
    """Resolve every run's config; the first bad one raises, named after its run."""
    configs = []
    for spec in specs:
        try:
            configs.append(spec.config())
        except ConfigError as e:
            raise ConfigError(f"sweep run {spec.name} seed {spec.seed}: {e}") from None
    return configs


def describe(specs: Sequence[RunSpec]) -> str:
    """One line per run (what ``kava sweep --dry-run`` prints)."""
    lines = []
    for spec in specs:
        state = run_state(spec.output_dir) or "new"
        params = " ".join(f"{k}={format_value(v)}" for k, v in spec.params.items()) or "(base config)"
        lines.append(f"{spec.name:<32} seed {spec.seed:<3} [{state}] {params} -> {spec.output_dir}")
    return "\n".join(lines)


# --- local execution --------------------------------------------------------------------


def read_status(run_dir: str | Path) -> dict | None:
    """A run folder's ``status.json``, or None where there is none or it cannot be read."""
    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        log.warning("%s is not valid JSON (%s): treating the run as unfinished", path, e)
        return None
    return status if isinstance(status, dict) else None


def run_state(run_dir: str | Path) -> str | None:
    """``finished``, ``running``, ``interrupted``, ``failed`` ... or None for no status."""
    status = read_status(run_dir)
    return None if status is None else str(status.get("state"))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Fields that say how to run, not what is trained: a change of these is not a change of the run.
_NOT_SETTINGS = ("train.overwrite_output_dir", "train.progress")


def config_change(spec: RunSpec, cfg: KavaConfig | None = None) -> str | None:
    """How the run's resolved config differs from the ``config.yaml`` in its folder (the
    first differing field, both values), or None where they agree or there is none."""
    on_disk = spec.output_dir / "config.yaml"
    if not on_disk.is_file():
        return None
    try:
        old = _flat(config_from_dict(read_yaml(on_disk)).to_dict())
    except ConfigError as e:
        return f"its {on_disk} cannot be read ({e})"
    new = _flat((cfg or spec.config()).to_dict())
    for key in new:
        if key not in _NOT_SETTINGS and old.get(key) != new[key]:
            return f"{key} is {format_value(old.get(key))} in {on_disk} but {format_value(new[key])} now"
    return None


def plan(specs: Sequence[RunSpec], resume: bool = True, overwrite: bool = False) -> list[tuple[RunSpec, str]]:
    """What :func:`run_local` would do with each run: ``skip``, ``resume``, ``start`` or ``restart``.

    With ``resume``, finished runs are skipped and any other run folder with a status
    (crashed, failed, interrupted, killed while running) is resumed from its latest
    checkpoint. Without it every run starts from scratch, which is refused for run folders
    that already hold a status (their metrics would be mixed).

    A run folder whose ``config.yaml`` differs from the run's resolved config (the sweep file
    or its base config was edited) stops the sweep with a :class:`SweepError` naming the
    field, before anything runs; with ``overwrite`` such a run is started afresh
    (``restart``: its old files are deleted).
    """
    out = []
    for spec in specs:
        state = run_state(spec.output_dir)
        if state is not None or (spec.output_dir / "config.yaml").is_file():
            try:
                change = config_change(spec)
            except ConfigError as e:
                raise ConfigError(f"sweep run {spec.name} seed {spec.seed}: {e}") from None
            if change is not None:
                if overwrite:
                    out.append((spec, "restart"))
                    continue
                raise SweepError(
                    f"sweep run {spec.name} seed {spec.seed}: {spec.output_dir} was run with another config "
                    f"({change}); delete that folder, give the sweep another output_dir, or pass --overwrite "
                    "to run it afresh"
                )
        if not resume and state is not None:
            raise SweepError(f"{spec.output_dir} already holds a run ({state}); resume it or delete the folder")
        if state == "finished":
            out.append((spec, "skip"))
        elif state is None:
            out.append((spec, "start"))
        else:
            out.append((spec, "resume"))
    return out


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:500]


def record_failure(spec: RunSpec, error: BaseException) -> None:
    """Mark the run folder ``failed`` with the one-line error, keeping the last known progress."""
    previous = read_status(spec.output_dir) or {}
    status: dict[str, Any] = {"state": "failed"}
    status.update({k: previous[k] for k in ("step", "max_steps", "checkpoint") if k in previous})
    status.update({"error": _one_line(error), "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    atomic_write_json(spec.output_dir / "status.json", status)


def _default_train() -> TrainFn:
    from ..training.loop import train

    return train


@dataclass
class SweepSummary:
    """What :func:`run_local` did; ``exit_code`` is 0 only if every run finished."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed else 0

    def __str__(self) -> str:
        parts = [
            f"{len(self.finished)} finished",
            f"{len(self.skipped)} skipped (already finished)",
            f"{len(self.failed)} failed",
        ]
        if self.interrupted:
            parts.append(f"{len(self.interrupted)} interrupted")
        text = ", ".join(parts)
        if self.failed:
            text += "\nfailed: " + ", ".join(self.failed)
        return text


def run_local(
    specs: Sequence[RunSpec], resume: bool = True, train_fn: TrainFn | None = None, overwrite: bool = False
) -> SweepSummary:
    """Run the sweep here, one run after another, through ``train_fn`` (:func:`kava.training.train`).

    Finished runs are skipped; unfinished ones are resumed (see :func:`plan`). Every config
    is resolved before the first run starts. A run that raises is logged with its
    traceback, marked ``failed`` in its ``status.json`` and counted, and the sweep goes on.
    A run that stops on a signal (``state == "interrupted"``) stops the sweep.
    """
    train_fn = train_fn or _default_train()
    steps = plan(specs, resume, overwrite)
    configs = validate_specs([spec for spec, _ in steps])
    summary = SweepSummary()
    for i, ((spec, action), cfg) in enumerate(zip(steps, configs), 1):
        label = f"{spec.name}/seed{spec.seed}"
        if action == "skip":
            log.info("[%d/%d] %s: already finished, skipped", i, len(steps), label)
            summary.skipped.append(label)
            continue
        log.info(
            "[%d/%d] %s: %s",
            i,
            len(steps),
            label,
            {"resume": "resuming", "restart": "starting afresh (its config changed)"}.get(action, "starting"),
        )
        if action == "restart":
            cfg.train.overwrite_output_dir = True
        try:
            result = train_fn(cfg, resume=resume and action != "restart")
        except Exception as e:  # one crashed run must not end the sweep: record, log, count
            log.exception("%s failed: %s", label, _one_line(e))
            record_failure(spec, e)
            summary.failed.append(label)
            continue
        state = (result or {}).get("state", "finished")
        if state == "interrupted":
            log.warning("%s was interrupted: stopping the sweep (run it again to resume)", label)
            summary.interrupted.append(label)
            break
        summary.finished.append(label)
    log.info("sweep: %s", summary)
    return summary


__all__ = [
    "RunSpec",
    "SweepError",
    "SweepSummary",
    "describe",
    "expand_sweep",
    "format_value",
    "plan",
    "read_status",
    "record_failure",
    "run_local",
    "run_state",
    "safe_name",
    "validate_specs",
]

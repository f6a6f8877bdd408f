"""The run folder (``train.output_dir``): one run at a time, nothing of another run mixed in.

:func:`claim_run_folder` is what :func:`kava.training.train` does before any other work:

- **lock**: an exclusive ``flock`` on ``.kava.lock`` in the folder, held until the run ends
  (the kernel drops it when the process dies, even by ``kill -9``); a second run into the
  same folder stops with one line naming the holder (pid, host, start time);
- **temporary entries** a killed save left (``.checkpoint-N.XXXX``, ``.NAME.XXXX.tmp``) are
  removed; a ``.checkpoint-N.old`` whose ``checkpoint-N`` is gone (killed between the two
  renames of a save) is put back, since it is the last good checkpoint;
- a **fresh start** (no ``--resume``) into a folder that holds anything is refused unless
  ``train.overwrite_output_dir`` (``kava train --overwrite``) is set, which deletes the files
  kava writes there (checkpoints, metrics, status, config, evaluations) and keeps others; the
  deletion waits until the whole run has been set up (config, data, ``init_from``, model), so a
  run that cannot start deletes nothing;
- **no symlink is followed**: the folder must be a folder (not a file, not a dangling link),
  writable, and none of the names kava writes in it (the lock, metrics, status, checkpoints)
  may be a symbolic link;
- on **resume**, a torn last line of ``metrics.jsonl`` (a crash or a full disk mid-append)
  is cut off before new lines are appended, and a configuration that differs from the run's
  ``config.yaml`` in a field that changes the result is refused by name
  (:func:`check_resume_config`; :data:`RESUME_MAY_CHANGE` lists what may change).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import (
    RESUME_MAY_CHANGE,
    RESUME_STEP_COUNT,
    ConfigError,
    KavaConfig,
    config_from_dict,
    load_config,
    read_yaml,
    under_output_root,
)
from ..io import atomic_write_json, drop_torn_tail
from ..model.checkpoints import CHECKPOINT_RE, enclosing_checkpoint, latest_checkpoint
from ..model.checkpoints import CONFIG_FILE as CHECKPOINT_CONFIG
from ..model.files import ModelLoadError

log = logging.getLogger("kava.train")

LOCK_FILE = ".kava.lock"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
# What a run writes into its folder (what --overwrite deletes).
_OUTPUT_FILES = (
    "metrics.jsonl",
    "status.json",
    "config.yaml",
    "eval_metrics.json",
    "kv_cosine.json",
    "run_summary.json",
    "instruments.jsonl",
    "selector_keeps.json",
)
# (logs/: TensorBoard under train.report_to, wandb/: wandb's files, tensorboard/: older runs)
_OUTPUT_DIRS = (
    re.compile(r"^checkpoint-\d+$"),
    re.compile(r"^eval(-\d+)?$"),
    re.compile(r"^tensorboard$"),
    re.compile(r"^logs$"),
    re.compile(r"^wandb$"),
)
_OUTPUT_GLOB = re.compile(r"^predictions_[a-z]+\.jsonl$")
_TEMP = re.compile(r"^\.(checkpoint-\d+\..+|[^/]+\.[A-Za-z0-9_]{6,}\.tmp)$")
_OLD = re.compile(r"^\.(checkpoint-\d+)\.old$")


class RunFolderError(RuntimeError):
    """The run folder is in use or holds another run; the message says what to do."""


def _is_kava_name(name: str) -> bool:
    """Whether ``name`` is an entry a run writes or reads in its folder."""
    return (
        name == LOCK_FILE
        or name in _OUTPUT_FILES
        or bool(_OUTPUT_GLOB.match(name))
        or bool(_TEMP.match(name))
        or bool(_OLD.match(name))
        or any(r.match(name) for r in _OUTPUT_DIRS)
    )


def check_output_dir(folder: Path) -> None:
    """Stop with one line when ``folder`` cannot be a run folder: a file, a dangling symbolic
    link, not writable (or its nearest existing parent, when it does not exist yet), inside a
    checkpoint, or holding a symbolic link under a name kava writes (it would write through it)."""
    folder = Path(folder)
    try:
        _check_output_dir(folder)
    except OSError as e:  # a name too long, a loop of links: what the machine says of the path
        raise RunFolderError(f"train.output_dir {folder}: {e.strerror or e}") from None


def _check_output_dir(folder: Path) -> None:
    if folder.is_symlink() and not folder.exists():
        raise RunFolderError(f"train.output_dir {folder} is a dangling symbolic link (to {os.readlink(folder)})")
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"train.output_dir {folder} is a file, not a folder: choose another train.output_dir")
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise RunFolderError(f"train.output_dir {folder}: {probe} is a dangling symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise RunFolderError(f"train.output_dir {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise RunFolderError(f"train.output_dir {folder}: {probe} is not writable")
    inside = enclosing_checkpoint(probe)  # a run written into a checkpoint or export changes it
    if inside is not None:
        raise RunFolderError(
            f"train.output_dir {folder}: it is or lies inside the kava checkpoint {inside} (it holds "
            f"{CHECKPOINT_CONFIG}); a run folder goes outside any checkpoint"
        )
    if folder.is_dir():
        links = sorted(p.name for p in folder.iterdir() if p.is_symlink() and _is_kava_name(p.name))
        if links:
            raise RunFolderError(
                f"train.output_dir {folder}: {folder / links[0]} is a symbolic link; kava does not "
                "write through links in a run folder (replace it with the file or folder itself)"
            )


class RunLock:
    """An exclusive lock on a run folder, held by this process until :meth:`release`."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking (documented)
            log.warning("no fcntl on this platform: %s is not locked against a second run", self.folder)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunFolderError(f"train.output_dir {self.folder}: cannot create it ({e.strerror})") from None
        try:  # O_NOFOLLOW: a symbolic link planted as the lock never has its target truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise RunFolderError(
                f"cannot open the lock {self.path}: {e.strerror}"
                + (" (a symbolic link?)" if self.path.is_symlink() else "")
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(
                f"train.output_dir {self.folder} is in use by another run ({holder}, lock {self.path}); "
                "wait for it to end or choose another train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            ).encode()
            + b"\n",
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"
    except (OSError, ValueError):
        return "holder unknown"


def clean_temporary(folder: Path) -> list[str]:
    """Remove what a killed atomic write left in ``folder``; put back a checkpoint a killed
    save had moved aside. Returns the names removed or restored."""
    done = []
    if not folder.is_dir():
        return done
    for entry in sorted(folder.iterdir()):
        old = _OLD.match(entry.name)
        if old:
            final = folder / old.group(1)
            if final.exists():
                shutil.rmtree(entry)
                done.append(entry.name)
            else:
                os.replace(entry, final)
                log.warning("%s: put back %s (a save was killed after moving it aside)", folder, final.name)
                done.append(f"{entry.name} -> {final.name}")
        elif _TEMP.match(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            done.append(entry.name)
    if done:
        log.info("%s: cleaned up after an interrupted save: %s", folder, ", ".join(done))
    return done


def run_outputs(folder: Path) -> list[Path]:
    """The entries of ``folder`` that a kava run writes (what ``--overwrite`` deletes)."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() and (p.name in _OUTPUT_FILES or _OUTPUT_GLOB.match(p.name)))
        or (p.is_dir() and any(r.match(p.name) for r in _OUTPUT_DIRS))
    )


def prepare(folder: Path, resume: bool, overwrite: bool) -> None:
    """Clean temporary entries; refuse a fresh start into a folder that holds files (unless
    ``overwrite``: :func:`clear_previous_run` then deletes them, once the run is set up); cut a
    torn last metrics line on resume."""
    clean_temporary(folder)
    held = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []
    if held == ["status.json"] and _failed_start(folder / "status.json"):
        held = []  # only the status of a start that failed before any work: a new start replaces it
    if resume:
        cut = drop_torn_tail(folder / METRICS_FILE)
        if cut:
            log.warning(
                "%s: dropped a torn last line (%d bytes) left by an interrupted write", folder / METRICS_FILE, cut
            )
        return
    if not held:
        return
    if not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise RunFolderError(
            f"train.output_dir {folder} is not empty ({shown}): continue that run with --resume, "
            "start over with --overwrite (train.overwrite_output_dir=true, deletes its files), "
            "or choose another train.output_dir"
        )


def clear_previous_run(folder: Path) -> None:
    """Delete what a previous run wrote into ``folder`` (``--overwrite``), keeping other files."""
    held = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []
    if not held:
        return
    check_output_dir(folder)  # (again: nothing planted since the start is deleted through a link)
    outputs = run_outputs(folder)
    for p in outputs:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    kept = sorted(set(held) - {p.name for p in outputs})
    log.warning(
        "train.overwrite_output_dir: deleted %d entries of the previous run in %s%s",
        len(outputs),
        folder,
        f" (kept files kava did not write: {', '.join(kept)})" if kept else "",
    )


def _failed_start(path: Path) -> bool:
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(status, dict)
        and status.get("state") == "failed"
        and status.get("step") == 0
        and status.get("checkpoint") is None
    )


@contextmanager
def claim_run_folder(folder: Path, resume: bool, overwrite: bool, main: bool = True) -> Iterator[Callable[[], None]]:
    """Lock ``folder`` and prepare it (:func:`prepare`) for the duration of a run; on the
    main process only (the others write nothing there). Yields the function that deletes a
    previous run's files under ``overwrite`` (a no-op otherwise): call it once the run has been
    set up, so that a run which cannot start leaves the old one as it was."""
    if not main:
        yield lambda: None
        return
    check_output_dir(Path(folder))
    lock = RunLock(Path(folder))
    lock.acquire()
    try:
        prepare(Path(folder), resume, overwrite)
        yield (lambda: clear_previous_run(Path(folder))) if overwrite and not resume else (lambda: None)
    finally:
        lock.release()


def prune_checkpoints(folder: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``checkpoint-N`` folders (``keep`` 0: none)."""
    if keep <= 0:
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name)))
    gone = [p for _, p in found[:-keep]]
    for p in gone:
        shutil.rmtree(p)
    return gone


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_change(key: str, old: KavaConfig, new: KavaConfig) -> bool:
    if key in RESUME_MAY_CHANGE or any(p.endswith(".") and key.startswith(p) for p in RESUME_MAY_CHANGE):
        return True
    if key in RESUME_STEP_COUNT:
        # Under a constant schedule only the warm-up depends on the step count: the change is exact
        # when both give the same number of warm-up steps (the trainer's warmup_steps or
        # int(warmup_ratio * max_steps)).
        constant = old.train.lr_schedule == new.train.lr_schedule == "constant"
        return constant and _warmup_steps(old) == _warmup_steps(new) is not None
    return False


def _warmup_steps(cfg: KavaConfig) -> int | None:
    """The warm-up steps the trainer gives ``cfg``, or None where they depend on the data (a warm-up
    ratio of an epoch count)."""
    tc = cfg.train
    if tc.warmup_steps > 0 or tc.warmup_ratio == 0:
        return tc.warmup_steps
    return int(tc.warmup_ratio * tc.max_steps) if tc.max_steps > 0 else None


def _why_refused(key: str, old: KavaConfig, new: KavaConfig) -> str:
    if key not in RESUME_STEP_COUNT:
        return ""
    if not old.train.lr_schedule == new.train.lr_schedule == "constant":
        return " (a cosine schedule's length sets every step's learning rate)"
    before, after = _warmup_steps(old), _warmup_steps(new)
    if before is None or after is None:
        return " (a train.warmup_ratio of a step count that train.epochs sets: the warm-up depends on the data)"
    return f" (the warm-up of train.warmup_ratio {new.train.warmup_ratio} would change: {before} -> {after} steps)"


def config_changes(saved: KavaConfig, cfg: KavaConfig) -> list[tuple[str, object, object]]:
    """``(field, saved value, new value)`` for every field in which ``cfg`` differs from ``saved``."""
    old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_resume_config(folder: Path, cfg: KavaConfig) -> None:
    """Refuse to resume the run in ``folder`` with a ``cfg`` that differs from its ``config.yaml``
    in a field that changes the result (a seed, the batch, the learning rate, the data, a cosine
    schedule's length...): :class:`ConfigError` naming every such field. A folder without a saved
    config has nothing to compare with."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = config_from_dict(read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: the run's saved config cannot be read ({e})") from None
    if cfg.model.init_from and cfg.model.init_from != saved.model.init_from:
        # A run folder given as model.init_from: the run recorded the checkpoint it resolved to.
        from ..model import resolve_init_from

        cfg = copy.deepcopy(cfg)
        cfg.model.init_from = resolve_init_from(cfg.model.init_from)
    refused = [(k, a, b) for k, a, b in config_changes(saved, cfg) if not _may_change(k, saved, cfg)]
    if refused:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}{_why_refused(k, saved, cfg)}" for k, a, b in refused)
        raise ConfigError(
            f"--resume into {folder}: the config differs from the run's {CONFIG_FILE} in {shown}; a resume "
            "continues the run as it was configured (what may change: kava train --help): start a new run "
            "(another train.output_dir, or --overwrite)"
        )


def resume_config(path: str | Path | None, overrides: list[str]) -> KavaConfig:
    """The configuration ``kava train --config PATH --resume OVERRIDES`` continues with: the run's
    own ``config.yaml`` (in the ``train.output_dir`` that ``PATH`` and ``OVERRIDES`` name) with
    ``OVERRIDES`` on top, so the overrides the run was started with need not be given again. A
    folder without a saved config: ``PATH`` with ``OVERRIDES``, as a fresh start."""
    cfg = load_config(path, overrides)
    folder = under_output_root(cfg.train.output_dir, cfg.train.output_root)
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        return cfg
    run_cfg = load_config(saved, overrides)
    run_cfg.train.output_dir, run_cfg.train.output_root = str(folder), ""  # (a copied or moved run folder)
    ignored = [k for k, _, _ in config_changes(cfg, run_cfg) if k not in ("train.output_dir", "train.output_root")]
    if ignored:
        log.info(
            "--resume: continuing with %s; %s differs from it in %s (the run keeps its own values)",
            saved,
            path or "the defaults",
            ", ".join(ignored),
        )
    return run_cfg


# --- status.json ---------------------------------------------------------------------


def read_status(folder: Path) -> dict | None:
    """The run folder's ``status.json`` as a mapping, or None (absent, unreadable or not one)."""
    path = Path(folder) / "status.json"
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("step", 0), int) else None


def _error_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")[:500]


def write_failed_status(folder: Path, error: BaseException, step: int, max_steps: int) -> None:
    """``status.json`` says ``failed`` at ``step`` with the error's first line and the folder's
    last checkpoint."""
    try:
        last = latest_checkpoint(folder)
    except ModelLoadError:  # a damaged newest checkpoint: the error being raised matters more
        last = None
    status = {
        "state": "failed",
        "step": step,
        "max_steps": max_steps,
        "error": _error_line(error),
        "checkpoint": str(last) if last else None,
        "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        atomic_write_json(Path(folder) / "status.json", status)
    except OSError as e:  # a full disk, say: the error being raised matters more
        log.error("could not mark %s failed: %s", folder, e)


def write_failed_start(folder: Path, error: BaseException) -> None:
    """A ``status.json`` saying why a fresh start failed before any work, in a folder that holds no run
    yet: an existing run's files (an ``--overwrite`` that could not start) stay as they were."""
    if (folder / "status.json").exists() or (folder / "status.json").is_symlink():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            folder / "status.json",
            {
                "state": "failed",
                "step": 0,
                "error": _error_line(error),
                "checkpoint": None,
                "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )
    except OSError as e:
        log.error("could not mark %s failed: %s", folder, e)

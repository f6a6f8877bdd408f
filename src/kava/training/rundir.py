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
  is cut off before new lines are appended.
"""

from __future__ import annotations

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

from ..io import drop_torn_tail
from ..model.checkpoints import CHECKPOINT_RE

log = logging.getLogger("kava.train")

LOCK_FILE = ".kava.lock"
METRICS_FILE = "metrics.jsonl"
# What a run writes into its folder (what --overwrite deletes).
_OUTPUT_FILES = ("metrics.jsonl", "status.json", "config.yaml", "eval_metrics.json", "kv_cosine.json", "run_summary.json",
                 "instruments.jsonl", "selector_keeps.json")
# (logs/: TensorBoard under train.report_to, wandb/: wandb's files, tensorboard/: older runs)
_OUTPUT_DIRS = (re.compile(r"^checkpoint-\d+$"), re.compile(r"^eval(-\d+)?$"), re.compile(r"^tensorboard$"), re.compile(r"^logs$"),
                re.compile(r"^wandb$"))
_OUTPUT_GLOB = re.compile(r"^predictions_[a-z]+\.jsonl$")
_TEMP = re.compile(r"^\.(checkpoint-\d+\..+|[^/]+\.[A-Za-z0-9_]{6,}\.tmp)$")
_OLD = re.compile(r"^\.(checkpoint-\d+)\.old$")


class RunFolderError(RuntimeError):
    """The run folder is in use or holds another run; the message says what to do."""


def _is_kava_name(name: str) -> bool:
    """Whether ``name`` is an entry a run writes or reads in its folder."""
    return (name == LOCK_FILE or name in _OUTPUT_FILES or bool(_OUTPUT_GLOB.match(name)) or bool(_TEMP.match(name))
            or bool(_OLD.match(name)) or any(r.match(name) for r in _OUTPUT_DIRS))


def check_output_dir(folder: Path) -> None:
    """Stop with one line when ``folder`` cannot be a run folder: a file, a dangling symbolic
    link, not writable (or its nearest existing parent, when it does not exist yet), or
    holding a symbolic link under a name kava writes (it would write through it)."""
    folder = Path(folder)
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
    if folder.is_dir():
        links = sorted(p.name for p in folder.iterdir() if p.is_symlink() and _is_kava_name(p.name))
        if links:
            raise RunFolderError(f"train.output_dir {folder}: {folder / links[0]} is a symbolic link; kava does not "
                                 "write through links in a run folder (replace it with the file or folder itself)")


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
        self.folder.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a symbolic link planted as the lock never has its target truncated
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise RunFolderError(f"cannot open the lock {self.path}: {e.strerror}"
                                 + (" (a symbolic link?)" if self.path.is_symlink() else "")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderError(f"train.output_dir {self.folder} is in use by another run ({holder}, lock {self.path}); "
                                 "wait for it to end or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode() + b"\n")
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
    return sorted(p for p in folder.iterdir()
                  if (p.is_file() and (p.name in _OUTPUT_FILES or _OUTPUT_GLOB.match(p.name)))
                  or (p.is_dir() and any(r.match(p.name) for r in _OUTPUT_DIRS)))


def prepare(folder: Path, resume: bool, overwrite: bool) -> None:
    """Clean temporary entries; refuse a fresh start into a folder that holds files (unless
    ``overwrite``: :func:`clear_previous_run` then deletes them, once the run is set up); cut a
    torn last metrics line on resume."""
    clean_temporary(folder)
    held = sorted(p.name for p in folder.iterdir() if p.name != LOCK_FILE) if folder.is_dir() else []
    if resume:
        cut = drop_torn_tail(folder / METRICS_FILE)
        if cut:
            log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted write", folder / METRICS_FILE, cut)
        return
    if not held:
        return
    if not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise RunFolderError(f"train.output_dir {folder} is not empty ({shown}): continue that run with --resume, "
                             "start over with --overwrite (train.overwrite_output_dir=true, deletes its files), "
                             "or choose another train.output_dir")


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
    log.warning("train.overwrite_output_dir: deleted %d entries of the previous run in %s%s", len(outputs), folder,
                f" (kept files kava did not write: {', '.join(kept)})" if kept else "")


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

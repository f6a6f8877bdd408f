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
  kava writes there (checkpoints, metrics, status, config, evaluations) and keeps others;
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
from collections.abc import Iterator
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
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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
    """Clean temporary entries; refuse (or, with ``overwrite``, clear) a fresh start into a
    folder that holds files; cut a torn last metrics line on resume."""
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
    outputs = run_outputs(folder)
    for p in outputs:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    kept = sorted(set(held) - {p.name for p in outputs})
    log.warning("train.overwrite_output_dir: deleted %d entries of the previous run in %s%s", len(outputs), folder,
                f" (kept files kava did not write: {', '.join(kept)})" if kept else "")


@contextmanager
def claim_run_folder(folder: Path, resume: bool, overwrite: bool, main: bool = True) -> Iterator[None]:
    """Lock ``folder`` and prepare it (:func:`prepare`) for the duration of a run; on the
    main process only (the others write nothing there)."""
    if not main:
        yield
        return
    lock = RunLock(Path(folder))
    lock.acquire()
    try:
        prepare(Path(folder), resume, overwrite)
        yield
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

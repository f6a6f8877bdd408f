"""Logging set-up shared by the ``kava`` command and the demo's worker processes."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """Timestamped INFO lines (DEBUG with ``verbose``) on stderr; chatty libraries at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for own_handler in ("huggingface_hub", "datasets"):  # they print with a handler of their own: once is enough
        logging.getLogger(own_handler).propagate = False


class _ClosedPipeProof:
    """A text stream whose writes and flushes never raise for a closed reader (``kava train |
    head``): the first ``BrokenPipeError`` sends everything after it to ``os.devnull``, so a
    closed stdout or stderr never stops a run. Everything else is the wrapped stream's."""

    def __init__(self, stream):
        self._stream = stream

    def _guarded(self, name: str, *args):
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            import os

            self._stream = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
            return None

    def write(self, text: str):
        return self._guarded("write", text)

    def flush(self):
        return self._guarded("flush")

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def survive_closed_pipes() -> None:
    """Make ``sys.stdout`` and ``sys.stderr`` proof against a reader that went away (see
    :class:`_ClosedPipeProof`); called before logging is set up, so its handler writes through it."""
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ClosedPipeProof):
            setattr(sys, name, _ClosedPipeProof(stream))

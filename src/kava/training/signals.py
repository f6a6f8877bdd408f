"""SIGINT/SIGTERM during a run: a flag checked between optimizer steps while training
(:class:`StopSignal`, so the step finishes and a checkpoint is saved), an exception at once
during the work after the last checkpoint (:class:`RaiseOnSignal`, raising :class:`Stopped`)."""

from __future__ import annotations

import signal


class Stopped(BaseException):
    """A SIGINT/SIGTERM during the work after the last checkpoint (no step to finish first)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SignalHandlers:
    """Installs ``self._handle`` for SIGINT/SIGTERM for the duration of a ``with`` block and
    restores the previous handlers after it."""

    def __init__(self):
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class RaiseOnSignal(SignalHandlers):
    """SIGINT/SIGTERM raise :class:`Stopped` at once (a BaseException, so no handler of
    ordinary errors swallows it)."""

    def _handle(self, signum, frame):
        raise Stopped(signum)


class StopSignal(SignalHandlers):
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps."""

    def __init__(self):
        super().__init__()
        self.received: int | None = None

    def _handle(self, signum, frame):
        self.received = signum

"""The error a run that cannot start or go on raises; the message says why."""


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says why."""

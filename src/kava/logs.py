"""Logging set-up shared by the ``kava`` command and the demo's worker processes."""

from __future__ import annotations

import logging


def setup_logging(verbose: bool) -> None:
    """Timestamped INFO lines (DEBUG with ``verbose``) on stderr; chatty libraries at WARNING."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

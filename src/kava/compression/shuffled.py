"""The negative control: each student is matched to another example's compressed cache."""

from __future__ import annotations

from dataclasses import dataclass

from .rkv import RKVSelector


@dataclass
class ShuffledSelector(RKVSelector):
    """R-KV selection whose targets are then rolled by one example along the batch.

    The roll itself is done by :func:`kava.compression.compress_cache` (and
    :func:`kava.compression.select`), which know where the batch dimension is.
    """

    name: str = "shuffled"
    shuffle_batch = True

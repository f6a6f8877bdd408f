"""Example schema (placeholder until the data layer lands)."""
from __future__ import annotations

import re
from dataclasses import dataclass


class DataError(ValueError):
    pass


@dataclass(frozen=True)
class Example:
    question: str
    steps: tuple
    answer: str
    source_id: str = ""


def step_result(step: str) -> str | None:
    m = re.search(r"<<[^>]*=([^=>]*)>>", step)
    if m:
        return m.group(1).strip()
    nums = re.findall(r"-?\d+(?:\.\d+)?", step)
    return nums[-1] if nums else None

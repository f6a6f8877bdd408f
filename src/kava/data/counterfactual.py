"""Counterfactual chains of thought: the same question and format, wrong intermediate results.

The ``counterfactual`` KV control (see :mod:`kava.distill.compression`) has the teacher read
``Q C' A``, where ``C'`` is ``C`` with every step's result changed and nothing else: the
same steps, operators, separators and lengths, so the same token types at the same positions,
but other values. A per-example digit map with no fixed point (a derangement of 0-9, drawn from
the example's ``source_id`` and a seed) is applied

* to the digits of each step's result (:func:`kava.data.schema.result_span`), so every result
  changes and keeps its number of digits;
* to every number in a later step, outside that step's own result, that equals an earlier step's
  true result: the wrong value is carried forward where the trace reuses it, so the chain stays
  consistent in what it carries (a question number that happens to equal an earlier result is
  read as that result).

The answer is left as it is.
"""

from __future__ import annotations

import random
import zlib

from ..answers import number_spans
from .schema import Example, result_span


def derangement(rng: random.Random) -> dict[str, str]:
    """A map of the ten digits onto themselves with no digit left in place."""
    digits = list("0123456789")
    while True:
        perm = digits[:]
        rng.shuffle(perm)
        if all(a != b for a, b in zip(digits, perm)):
            return dict(zip(digits, perm))


def _mapped(text: str, digit_map: dict[str, str]) -> str:
    return "".join(digit_map.get(c, c) for c in text)


def counterfactual_steps(steps: tuple[str, ...] | list[str], digit_map: dict[str, str]) -> list[str]:
    """``steps`` with each result's digits mapped by ``digit_map``, and later uses of an earlier
    true result (a whole number equal to it, outside the step's own result) mapped the same way."""
    out, earlier = [], set()
    for step in steps:
        own = result_span(step)
        pieces, last = [], 0
        for start, end in number_spans(step):
            if own is not None and start < own[1] and end > own[0]:
                continue  # the step's own result: mapped below
            if step[start:end] in earlier:
                pieces += [step[last:start], _mapped(step[start:end], digit_map)]
                last = end
        text = "".join(pieces) + step[last:]
        if own is not None:
            # Offsets of ``own`` still hold: a mapped number keeps its length.
            text = text[: own[0]] + _mapped(text[own[0] : own[1]], digit_map) + text[own[1] :]
            earlier.add(step[own[0] : own[1]])
        out.append(text)
    return out


def counterfactual_example(ex: Example, seed: int = 0) -> Example:
    """``ex`` with a counterfactual chain of thought (see the module doc); deterministic in
    ``ex.source_id`` (or the question when it has none) and ``seed``."""
    key = ex.source_id or ex.question
    rng = random.Random(zlib.crc32(f"kava-counterfactual-{seed}-{key}".encode("utf-8")))
    steps = counterfactual_steps(ex.steps, derangement(rng))
    return Example(ex.question, tuple(steps), ex.answer, ex.source_id)


__all__ = ["counterfactual_example", "counterfactual_steps", "derangement"]

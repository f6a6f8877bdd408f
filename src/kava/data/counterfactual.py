"""Counterfactual chains of thought: the same question and format, wrong intermediate results.

The ``counterfactual`` KV control (see :mod:`kava.distill.compression`) has the teacher read
``Q C' A``, where ``C'`` is ``C`` with every step's result changed and nothing else: the
same steps, operators, separators and lengths, so the same token types at the same positions,
but other values. A per-example digit map with no fixed point (a derangement of 0-9, drawn from
the example's ``source_id`` and a seed) is applied to the digits of each step's result
(:func:`kava.data.schema.result_span`), so every result changes and keeps its number of digits,
and the wrong value is carried forward wherever a later step reuses that result, so the chain
stays consistent in what it carries. Numbers copied from the question never change.

Where an operand comes from is known exactly for the embedded tasks (:mod:`kava.data.synthetic`:
chains and sums of products in every trace style), whose chains are rebuilt from the question
with the mapped results. Any other chain is rewritten from its text: a number in a later step
that equals an earlier step's true result is read as that result (so a question number that
happens to equal an earlier result changes too: the text cannot tell them apart).

The answer is left as it is.
"""

from __future__ import annotations

import random
import zlib

from ..answers import number_spans
from . import synthetic
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


def _mapped_int(value: int, digit_map: dict[str, str]) -> int:
    return int(_mapped(str(value), digit_map))


def embedded_counterfactual_steps(ex: Example, digit_map: dict[str, str]) -> list[str] | None:
    """The counterfactual chain of an example of the embedded tasks, rebuilt from its question
    (every result mapped, carried operands carry the mapped value, question operands unchanged);
    None when ``ex`` is not one (its steps are not what the task writes for its question)."""
    steps = list(ex.steps)
    digits = synthetic.parse_products_question(ex.question)
    if digits is not None:
        products, sums = synthetic.products_values(digits)
        for style in ("eq", "nl", "verbose"):
            if synthetic.render_products_steps(digits, products, sums, style) == steps:
                # The verbose style also writes each product before its last digit: mapped digit by
                # digit, whose last digit is then the mapped result.
                full = [_mapped(str(a * b), digit_map) for a, b in zip(digits[0::2], digits[1::2])][: len(products)]
                return synthetic.render_products_steps(
                    digits,
                    [_mapped_int(p, digit_map) for p in products],
                    [_mapped_int(v, digit_map) for v in sums],
                    style,
                    full_products=full,
                )
    parsed = synthetic.parse_chain_question(ex.question)
    if parsed is not None:
        start, chain = parsed
        values = synthetic.evaluate_chain(start, chain, 10)
        for style in ("eq", "nl"):
            if synthetic.render_chain_steps(start % 10, chain, values, style) == steps:
                return synthetic.render_chain_steps(
                    start % 10, chain, [_mapped_int(v, digit_map) for v in values], style
                )
    return None


def counterfactual_example(ex: Example, seed: int = 0) -> Example:
    """``ex`` with a counterfactual chain of thought (see the module doc); deterministic in
    ``ex.source_id`` (or the question when it has none) and ``seed``."""
    key = ex.source_id or ex.question
    rng = random.Random(zlib.crc32(f"kava-counterfactual-{seed}-{key}".encode("utf-8")))
    digit_map = derangement(rng)
    steps = embedded_counterfactual_steps(ex, digit_map)
    if steps is None:
        steps = counterfactual_steps(ex.steps, digit_map)
    return Example(ex.question, tuple(steps), ex.answer, ex.source_id)


__all__ = ["counterfactual_example", "counterfactual_steps", "derangement", "embedded_counterfactual_steps"]

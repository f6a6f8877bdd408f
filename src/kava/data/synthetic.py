"""An embedded reasoning task for CPU work: modular arithmetic chains.

A question such as ``7*2-7-4*8`` is evaluated LEFT TO RIGHT modulo `modulus` (10 by
default): 7*2=4, 4-7=7, 7-4=3, 3*8=4, so the answer is "4". Steps come in two styles that
mirror GSM8k-AUG and GSM8k-AUG-NL:

- ``eq``: ``["<<7*2=4>>", "<<4-7=7>>", "<<7-4=3>>", "<<3*8=4>>"]``
- ``nl``: ``["7 times 2 is 4.", "4 minus 7 is 7.", "7 minus 4 is 3.", "3 times 8 is 4."]``

Splits are disjoint by construction: every question belongs to exactly one split through
a stable hash of its text (80% train, 10% valid, 10% test), and each split draws with
its own seed, rejecting questions of other splits. So no test question is ever in train,
whatever the sizes or seeds.
"""

from __future__ import annotations

import random
import zlib

from kava.data.schema import Example, step_results

__all__ = ["OP_WORDS", "SPLITS", "evaluate_chain", "generate", "generate_split", "split_of", "step_results"]

OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
SPLITS = ("train", "valid", "test")
# Hash buckets (out of 10) that belong to each split.
_BUCKETS = {"train": range(8), "valid": range(8, 9), "test": range(9, 10)}
_STYLES = ("eq", "nl")


def _check_knobs(n_ops: int, modulus: int, max_operand: int, ops: str, style: str) -> None:
    if n_ops < 1:
        raise ValueError(f"n_ops must be >= 1, got {n_ops}")
    if modulus < 2:
        raise ValueError(f"modulus must be >= 2, got {modulus}")
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    if not ops or any(op not in OP_WORDS for op in ops):
        raise ValueError(f"ops must be a non-empty string of {''.join(OP_WORDS)!r}, got {ops!r}")
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}")


def _apply(a: int, op: str, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    return (a * b) % modulus


def evaluate_chain(start: int, ops: list[tuple[str, int]], modulus: int) -> list[int]:
    """The running value after each operation, evaluated left to right modulo `modulus`."""
    values = []
    value = start % modulus
    for op, operand in ops:
        value = _apply(value, op, operand, modulus)
        values.append(value)
    return values


def _example(start: int, chain: list[tuple[str, int]], modulus: int, style: str, source_id: str) -> Example:
    question = str(start) + "".join(f"{op}{operand}" for op, operand in chain)
    results = evaluate_chain(start, chain, modulus)
    steps = []
    prev = start % modulus
    for (op, operand), value in zip(chain, results):
        if style == "eq":
            steps.append(f"<<{prev}{op}{operand}={value}>>")
        else:
            steps.append(f"{prev} {OP_WORDS[op]} {operand} is {value}.")
        prev = value
    return Example(question=question, steps=tuple(steps), answer=str(results[-1]), source_id=source_id)


def _draw(rng: random.Random, n_ops: int, modulus: int, max_operand: int, ops: str) -> tuple[int, list[tuple[str, int]]]:
    start = rng.randrange(modulus)
    chain = [(rng.choice(ops), rng.randint(1, max_operand)) for _ in range(n_ops)]
    return start, chain


def generate(
    n: int,
    seed: int,
    *,
    n_ops: int = 4,
    modulus: int = 10,
    max_operand: int = 9,
    ops: str = "+-*",
    style: str = "eq",
    tag: str | None = None,
) -> list[Example]:
    """`n` random chains (duplicates possible), deterministic in `seed`.

    The start is drawn from [0, modulus), each of the `n_ops` operands from
    [1, max_operand]. `source_id` is ``synthetic-{style}-{tag}-{i}`` (tag defaults to
    ``s{seed}``).
    """
    _check_knobs(n_ops, modulus, max_operand, ops, style)
    rng = random.Random(f"kava-synthetic-{seed}")
    tag = tag if tag is not None else f"s{seed}"
    out = []
    for i in range(n):
        start, chain = _draw(rng, n_ops, modulus, max_operand, ops)
        out.append(_example(start, chain, modulus, style, f"synthetic-{style}-{tag}-{i}"))
    return out


def split_of(question: str) -> str:
    """The split a question belongs to (a stable hash of its text)."""
    bucket = zlib.crc32(question.encode("utf-8")) % 10
    for split, buckets in _BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError("unreachable: buckets cover 0..9")


def generate_split(
    split: str,
    n: int,
    seed: int = 0,
    *,
    n_ops: int = 4,
    modulus: int = 10,
    max_operand: int = 9,
    ops: str = "+-*",
    style: str = "eq",
    unique: bool = True,
    test_size: int | None = None,
) -> list[Example]:
    """`n` examples of `split` ("train", "valid" or "test"), disjoint from other splits.

    Each split draws with its own seed derived from (`seed`, `split`) and regenerates any
    question that hashes into another split; with `unique` it also regenerates repeats
    within the split. Raises ValueError when the question space is too small for `n`.
    `test_size` is accepted for callers that size the test split separately; disjointness
    does not depend on it.
    """
    del test_size  # disjointness is structural (hash partition), not size-dependent
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    _check_knobs(n_ops, modulus, max_operand, ops, style)
    rng = random.Random(f"kava-synthetic-{seed}-{split}")
    space = modulus * (len(set(ops)) * max_operand) ** n_ops
    max_draws = 50 * n + 1000
    seen: set[str] = set()
    out: list[Example] = []
    draws = 0
    while len(out) < n:
        if draws >= max_draws:
            raise ValueError(
                f"synthetic {split}: found only {len(out)} of {n} distinct questions after {draws} draws "
                f"(question space {space}); use fewer examples, more n_ops or unique=False"
            )
        draws += 1
        start, chain = _draw(rng, n_ops, modulus, max_operand, ops)
        question = str(start) + "".join(f"{op}{operand}" for op, operand in chain)
        if split_of(question) != split or (unique and question in seen):
            continue
        seen.add(question)
        out.append(_example(start, chain, modulus, style, f"synthetic-{style}-{split}-{len(out)}"))
    return out

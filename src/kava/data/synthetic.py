"""Embedded reasoning tasks for CPU work: modular arithmetic chains, and sums of products.

A question such as ``7*2-7-4*8`` is evaluated LEFT TO RIGHT modulo `modulus` (10 by
default): 7*2=4, 4-7=7, 7-4=3, 3*8=4, so the answer is "4". Steps come in two styles that
mirror GSM8k-AUG and GSM8k-AUG-NL:

- ``eq``: ``["<<7*2=4>>", "<<4-7=7>>", "<<7-4=3>>", "<<3*8=4>>"]``
- ``nl``: ``["7 times 2 is 4.", "4 minus 7 is 7.", "7 minus 4 is 3.", "3 times 8 is 4."]``

A second family, *sums of products* (:func:`generate_products_split`), is shaped like word
problems: several independent sub-results combined at the end. ``k`` products of digits 1-9,
added modulo 10; ``k = 1`` is ``a*b+c``. Its last step is always the addition of two values
already in the kept chain of thought (what a teacher with the last step dropped has to do
implicitly), and its dependency depth is ``k`` at most (products in parallel, then the sums):

- ``a*b+c``: ``<<a*b=p>> <<p+c=s>>``
- ``a*b+c*d``: ``<<a*b=p>> <<c*d=q>> <<p+q=s>>``
- ``a*b+c*d+e*f``: ``<<a*b=p>> <<c*d=q>> <<e*f=r>> <<p+q=s>> <<s+r=t>>``

Sizes are mixed (``sizes``, drawn uniformly per example), so accuracy can be read per size; the
number of CoT steps (2, 3, 5) tells the size of an example.

Splits are disjoint by construction: every question belongs to exactly one split through
a stable hash of its text (80% train, 10% valid, 10% test), and each split draws with
its own seed, rejecting questions of other splits. So no test question is ever in train,
whatever the sizes or seeds.
"""

from __future__ import annotations

import itertools
import random
import re
import zlib
from functools import lru_cache

from kava.data.schema import Example, step_results

__all__ = [
    "OP_WORDS",
    "SPLITS",
    "VERBOSE_WORDS",
    "class_of",
    "class_split_of",
    "classes_example",
    "evaluate_chain",
    "generate",
    "generate_classes_split",
    "generate_products_split",
    "generate_split",
    "parse_chain_question",
    "parse_products_question",
    "render_chain_steps",
    "products_example",
    "products_values",
    "render_products_steps",
    "split_of",
    "step_results",
]

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


def render_chain_steps(start: int, chain: list[tuple[str, int]], values: list[int], style: str) -> list[str]:
    """The steps of a chain with the given running values (the true ones, or counterfactual ones:
    each step's first operand carries the previous given value, its second is the question's)."""
    steps = []
    prev = start
    for (op, operand), value in zip(chain, values):
        if style == "eq":
            steps.append(f"<<{prev}{op}{operand}={value}>>")
        else:
            steps.append(f"{prev} {OP_WORDS[op]} {operand} is {value}.")
        prev = value
    return steps


def parse_chain_question(question: str) -> tuple[int, list[tuple[str, int]]] | None:
    """``(start, [(op, operand), ...])`` of a chain question such as ``7*2-7-4*8``, else None."""
    m = re.fullmatch(r"(\d+)((?:[-+*]\d+)+)", question)
    if m is None:
        return None
    return int(m.group(1)), [(op, int(x)) for op, x in re.findall(r"([-+*])(\d+)", m.group(2))]


def _example(start: int, chain: list[tuple[str, int]], modulus: int, style: str, source_id: str) -> Example:
    question = str(start) + "".join(f"{op}{operand}" for op, operand in chain)
    results = evaluate_chain(start, chain, modulus)
    steps = render_chain_steps(start % modulus, chain, results, style)
    return Example(question=question, steps=tuple(steps), answer=str(results[-1]), source_id=source_id)


def _draw(
    rng: random.Random, n_ops: int, modulus: int, max_operand: int, ops: str
) -> tuple[int, list[tuple[str, int]]]:
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


# --- sums of products ---------------------------------------------------------------------


def _step_text(a: int, op: str, b: int, value: int, style: str) -> str:
    return f"<<{a}{op}{b}={value}>>" if style == "eq" else f"{a} {OP_WORDS[op]} {b} is {value}."


def products_example(digits: tuple[int, ...], style: str, source_id: str, modulus: int = 10) -> Example:
    """The sum-of-products example for ``digits``: 3 digits give ``a*b+c``, 2k digits (k >= 2)
    give ``k`` products added left to right; every value modulo ``modulus``."""
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}")
    if len(digits) == 3:
        a, b, c = digits
        p = a * b % modulus
        s = (p + c) % modulus
        steps = (_step_text(a, "*", b, p, style), _step_text(p, "+", c, s, style))
        return Example(question=f"{a}*{b}+{c}", steps=steps, answer=str(s), source_id=source_id)
    if len(digits) < 4 or len(digits) % 2:
        raise ValueError(f"a sum of products takes 3 digits or an even number >= 4, got {len(digits)}")
    pairs = [digits[i : i + 2] for i in range(0, len(digits), 2)]
    products = [a * b % modulus for a, b in pairs]
    steps = [_step_text(a, "*", b, p, style) for (a, b), p in zip(pairs, products)]
    total = products[0]
    for p in products[1:]:
        new = (total + p) % modulus
        steps.append(_step_text(total, "+", p, new, style))
        total = new
    question = "+".join(f"{a}*{b}" for a, b in pairs)
    return Example(question=question, steps=tuple(steps), answer=str(total), source_id=source_id)


def _digit_count(k: int) -> int:
    return 3 if k == 1 else 2 * k


@lru_cache(maxsize=None)
def _questions_in_split(k: int, split: str, modulus: int) -> int | None:
    """How many distinct size-``k`` questions hash into ``split`` (None: over 100,000 questions
    in all, about 10,000 in test, never the limit)."""
    n = _digit_count(k)
    if 9**n > 10**5:
        return None
    return sum(
        split_of(products_example(d, "eq", "", modulus).question) == split
        for d in itertools.product(range(1, 10), repeat=n)
    )


def _quotas(n: int, sizes: tuple[int, ...], capacity: list[int | None]) -> list[int]:
    """``n`` examples shared as evenly as the sizes' capacities allow (a size with fewer
    distinct questions than its share takes them all, the others share the rest)."""
    quota = [0] * len(sizes)
    open_ = list(range(len(sizes)))
    left = n
    while open_ and left:
        share, extra = divmod(left, len(open_))
        full = []
        for rank, i in enumerate(open_):
            want = share + (rank < extra)
            cap = capacity[i]
            take = want if cap is None else min(want, cap - quota[i])
            quota[i] += take
            left -= take
            if cap is not None and quota[i] == cap:
                full.append(i)
        if not full:
            break
        open_ = [i for i in open_ if i not in full]
    if left:
        raise ValueError(f"only {n - left} distinct questions of sizes {sizes} exist in this split; ask for fewer")
    return quota


def generate_products_split(
    split: str,
    n: int,
    seed: int = 0,
    *,
    sizes: tuple[int, ...] | list[int] = (1, 2, 3),
    modulus: int = 10,
    style: str = "eq",
    unique: bool | None = None,
) -> list[Example]:
    """`n` sum-of-products examples of `split`, disjoint from the other splits (as
    :func:`generate_split`), digits drawn uniformly from 1-9.

    The sizes ``k`` (number of products) share `n` evenly, in a shuffled order. With `unique`
    (default: on for valid/test, off for train) no question repeats within the split; a size
    with fewer distinct questions than its share (``a*b+c`` has 729 in all, about 73 in test)
    takes all of them and the other sizes share the rest. ``source_id`` is
    ``synthetic-products-{style}-{split}-k{k}-{i}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    sizes = tuple(sizes)
    if (
        not sizes
        or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in sizes)
        or len(set(sizes)) != len(sizes)
    ):
        raise ValueError(f"sizes must be distinct positive integers, got {sizes!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if modulus < 2:
        raise ValueError(f"modulus must be >= 2, got {modulus}")
    if style not in _STYLES:
        raise ValueError(f"style must be one of {_STYLES}, got {style!r}")
    unique = split != "train" if unique is None else unique
    capacity = [_questions_in_split(k, split, modulus) if unique else None for k in sizes]
    quotas = _quotas(n, sizes, capacity)
    rng = random.Random(f"kava-products-{seed}-{split}")
    drawn: list[tuple[int, Example]] = []
    for k, quota in zip(sizes, quotas):
        seen: set[str] = set()
        count = 0
        while count < quota:
            ex = products_example(tuple(rng.randint(1, 9) for _ in range(_digit_count(k))), style, "", modulus)
            if split_of(ex.question) != split or (unique and ex.question in seen):
                continue
            seen.add(ex.question)
            drawn.append((k, ex))
            count += 1
    rng.shuffle(drawn)
    return [
        Example(ex.question, ex.steps, ex.answer, f"synthetic-products-{style}-{split}-k{k}-{i}")
        for i, (k, ex) in enumerate(drawn)
    ]


# --- sums of products split by equivalence class, with verbose natural-language traces ----
#
# Two questions are *equivalent* when they have the same multiset of product terms, each a
# multiset of factors: ``7*2+4*8``, ``8*4+7*2`` and ``2*7+4*8`` are one class (the same
# answer from the same products, in another order). The ``synthetic-classes`` datasets put
# every class in exactly one split (a stable hash of its canonical form), so no test question
# has an equivalent in training: the model must combine products it has seen in combinations it
# has not. Their ``nl`` traces are verbose: each step is a sentence that restates what it
# combines, in wording drawn per question, so the kept chain of thought is several times longer
# than the latents that replace it (as GSM8k-AUG-NL is against its equation form).

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
_FIRST_OPENERS = ("First,", "To start,", "We begin:", "To begin,")
_LATER_OPENERS = ("Next,", "Then,", "After that,", "Now")
_PRODUCT_TEMPLATES = (  # {f}: the product itself, {r}: its last digit (the step's result, its last number)
    "{o} we multiply {a} by {b}: {a} times {b} is {f}, and keeping only its last digit, the {n} product is {r}.",
    "{o} the {n} product comes from {a} and {b}; multiplying them gives {f}, whose last digit {r} is the {n} product.",
    "{o} we take {a} and {b} and multiply them to get {f}; the last digit of {f} makes the {n} product {r}.",
    "{o} {a} multiplied by {b} is {f}, and the last digit of that is the {n} product, so it is {r}.",
)
_SUM_TEMPLATES = (
    "{o} adding {x} to {y} gives {r}, the sum so far.",
    "{o} we add {x} and {y}, so the sum is {r}.",
    "{o} the sum of {x} and {y} is {r}.",
    "{o} putting {x} and {y} together makes {r}.",
)
VERBOSE_WORDS = tuple(
    sorted(
        {
            w.strip(",.:")
            for t in (*_PRODUCT_TEMPLATES, *_SUM_TEMPLATES, *_FIRST_OPENERS, *_LATER_OPENERS, *_ORDINALS)
            for w in t.split()
            if w.strip(",.:") and not w.startswith("{")
        }
    )
)
"""The words of the verbose traces (a tokenizer for them: ``model.tiny.tokenizer=verbose``)."""


def _class_key(pairs: list[tuple[int, ...]]) -> str:
    """The canonical text of an equivalence class: its product terms, factors sorted, terms sorted."""
    return "+".join(sorted("*".join(map(str, sorted(p))) for p in pairs))


def _pairs_of(digits: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The product terms of a question's digits (``a*b+c``: the term ``a*b`` and the term ``c``)."""
    if len(digits) == 3:
        return [digits[:2], digits[2:]]
    return [digits[i : i + 2] for i in range(0, len(digits), 2)]


def class_of(question: str) -> str:
    """The equivalence class of a sum-of-products question (``8*4+7*2`` -> ``2*7+4*8``)."""
    return _class_key([tuple(int(d) for d in term.split("*")) for term in question.split("+")])


def class_split_of(question: str) -> str:
    """The split a question's equivalence class belongs to (80% train, 10% valid, 10% test)."""
    return split_of(class_of(question))


def parse_products_question(question: str) -> tuple[int, ...] | None:
    """The digits of a sum-of-products question (``a*b+c`` or ``a*b+c*d+...``), else None."""
    terms = question.split("+")
    if len(terms) < 2 or not all(t for t in terms):
        return None
    digits: list[int] = []
    for i, term in enumerate(terms):
        factors = term.split("*")
        if not all(len(f) == 1 and f.isdigit() for f in factors):
            return None
        if len(factors) == 2 or (len(terms) == 2 and i == 1 and len(factors) == 1):
            digits += [int(f) for f in factors]
        else:
            return None
    if len(digits) == 3 or (len(digits) >= 4 and len(digits) % 2 == 0 and all(len(t.split("*")) == 2 for t in terms)):
        return tuple(digits)
    return None


def products_values(digits: tuple[int, ...], modulus: int = 10) -> tuple[list[int], list[int]]:
    """The step results of a sum of products: its products and its running sums (``a*b+c``: the
    product and one sum, the ``c`` taken as it is)."""
    pairs = _pairs_of(digits)
    if len(digits) == 3:
        p = digits[0] * digits[1] % modulus
        return [p], [(p + digits[2]) % modulus]
    products = [a * b % modulus for a, b in pairs]
    sums, total = [], products[0]
    for p in products[1:]:
        total = (total + p) % modulus
        sums.append(total)
    return products, sums


def render_products_steps(
    digits: tuple[int, ...], products: list[int], sums: list[int], style: str, full_products: list[str] | None = None
) -> list[str]:
    """The chain of thought of a sum of products, with the given step results (the true ones, or
    counterfactual ones: every operand that carries an earlier result shows the given value, every
    operand copied from the question stays as it is). ``style``: ``eq`` (``<<a*b=p>>``), ``nl``
    (the short sentences of ``synthetic-products-nl``) or ``verbose`` (a sentence per step that
    restates what it combines and, for a product, writes the product before its last digit, its
    wording drawn from the question's text). ``full_products``: the products as the verbose style
    writes them (default: the true ``a*b``)."""
    pairs = _pairs_of(digits)
    question = "+".join("*".join(map(str, p)) for p in pairs)
    # (a, op, b, result) of every step; a sum's first operand is the previous result.
    rows: list[tuple[int, str, int, int]] = [(a, "*", b, p) for (a, b), p in zip(pairs[: len(products)], products)]
    if len(digits) == 3:
        rows.append((products[0], "+", digits[2], sums[0]))
    else:
        prev = products[0]
        for p, s in zip(products[1:], sums):
            rows.append((prev, "+", p, s))
            prev = s
    if style in _STYLES:
        return [_step_text(a, op, b, r, style) for a, op, b, r in rows]
    if style != "verbose":
        raise ValueError(f"style must be one of eq, nl, verbose, got {style!r}")
    if full_products is None:
        full_products = [str(a * b) for a, b in pairs[: len(products)]]
    rng = random.Random(zlib.crc32(f"kava-verbose-{question}".encode("utf-8")))
    out = []
    for i, (a, op, b, r) in enumerate(rows):
        opener = rng.choice(_FIRST_OPENERS if i == 0 else _LATER_OPENERS)
        if op == "*":
            text = rng.choice(_PRODUCT_TEMPLATES).format(
                o=opener, a=a, b=b, r=r, f=full_products[i], n=_ORDINALS[min(i, len(_ORDINALS) - 1)]
            )
        else:
            text = rng.choice(_SUM_TEMPLATES).format(o=opener, x=a, y=b, r=r)
        out.append(text[0].upper() + text[1:])
    return out


def classes_example(digits: tuple[int, ...], style: str, source_id: str, modulus: int = 10) -> Example:
    """The example of ``digits`` in ``style`` (``eq``, ``nl`` or ``verbose``)."""
    products, sums = products_values(digits, modulus)
    question = "+".join("*".join(map(str, p)) for p in _pairs_of(digits))
    return Example(question, tuple(render_products_steps(digits, products, sums, style)), str(sums[-1]), source_id)


@lru_cache(maxsize=None)
def _class_questions_in_split(k: int, split: str) -> int | None:
    """How many distinct size-``k`` questions have their class in ``split`` (None: too many to count)."""
    n = _digit_count(k)
    if 9**n > 10**5:
        return None
    return sum(
        class_split_of("+".join("*".join(map(str, p)) for p in _pairs_of(d))) == split
        for d in itertools.product(range(1, 10), repeat=n)
    )


def generate_classes_split(
    split: str,
    n: int,
    seed: int = 0,
    *,
    sizes: tuple[int, ...] | list[int] = (1, 2),
    modulus: int = 10,
    style: str = "eq",
    unique: bool | None = None,
) -> list[Example]:
    """`n` sum-of-products examples of `split` whose equivalence classes (:func:`class_of`) belong
    to that split only, digits drawn uniformly from 1-9, the sizes sharing `n` evenly (shuffled);
    a size with fewer distinct questions in the split than its share (``a*b+c``: about 70 in test)
    takes them all and the others share the rest.

    With `unique` (default: on for valid/test, off for train) no question repeats within the split.
    ``style`` ``eq`` or ``verbose``. The same `seed` gives the same questions in both styles.
    ``source_id`` is ``synthetic-classes-{style}-{split}-k{k}-{i}``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if style not in ("eq", "verbose"):
        raise ValueError(f"style must be eq or verbose, got {style!r}")
    sizes = tuple(sizes)
    if (
        not sizes
        or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in sizes)
        or len(set(sizes)) != len(sizes)
    ):
        raise ValueError(f"sizes must be distinct positive integers, got {sizes!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    unique = split != "train" if unique is None else unique
    rng = random.Random(f"kava-classes-{seed}-{split}")
    quotas = _quotas(n, sizes, [_class_questions_in_split(k, split) if unique else None for k in sizes])
    drawn: list[tuple[int, Example]] = []
    for k, quota in zip(sizes, quotas):
        seen: set[str] = set()
        draws, limit, count = 0, 200 * quota + 10_000, 0
        while count < quota:
            if draws >= limit:
                raise ValueError(
                    f"synthetic-classes {split}: too few distinct questions of {k} products; ask for fewer"
                )
            draws += 1
            digits = tuple(rng.randint(1, 9) for _ in range(_digit_count(k)))
            question = "+".join("*".join(map(str, p)) for p in _pairs_of(digits))
            if class_split_of(question) != split or (unique and question in seen):
                continue
            seen.add(question)
            drawn.append((k, classes_example(digits, style, "", modulus)))
            count += 1
    rng.shuffle(drawn)
    return [
        Example(ex.question, ex.steps, ex.answer, f"synthetic-classes-{style}-{split}-k{k}-{i}")
        for i, (k, ex) in enumerate(drawn)
    ]

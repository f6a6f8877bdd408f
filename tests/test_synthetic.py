"""The embedded modular-arithmetic task."""

from __future__ import annotations

import re

import pytest

from kava.answers import is_correct
from kava.data.schema import Example, example_from_record, example_to_record
from kava.data.synthetic import evaluate_chain, generate, generate_split, split_of, step_results

_TOKEN_RE = re.compile(r"([+\-*])(\d+)")


def _reference(question: str, modulus: int) -> list[int]:
    """Independent left-to-right evaluation of a question string."""
    start = re.match(r"\d+", question)
    assert start is not None
    value = int(start.group(0)) % modulus
    out = []
    for op, num in _TOKEN_RE.findall(question[start.end() :]):
        b = int(num)
        value = {"+": value + b, "-": value - b, "*": value * b}[op] % modulus
        out.append(value)
    return out


def test_worked_example_from_the_docs() -> None:
    chain = [("*", 2), ("-", 7), ("-", 4), ("*", 8)]
    assert evaluate_chain(7, chain, 10) == [4, 7, 3, 4]


def test_left_to_right_not_precedence() -> None:
    # 2+3*4 is (2+3)*4 = 20 -> 0 mod 10, not 14
    assert evaluate_chain(2, [("+", 3), ("*", 4)], 10) == [5, 0]
    assert evaluate_chain(1, [("-", 3)], 10) == [8]  # negatives wrap to [0, modulus)
    assert evaluate_chain(5, [("*", 5), ("+", 6)], 7) == [4, 3]


@pytest.mark.parametrize("style", ["eq", "nl"])
@pytest.mark.parametrize(("modulus", "n_ops"), [(10, 4), (7, 3), (13, 6)])
def test_generated_examples_are_consistent(style: str, modulus: int, n_ops: int) -> None:
    exs = generate(200, seed=3, n_ops=n_ops, modulus=modulus, style=style)
    assert len(exs) == 200
    for ex in exs:
        assert re.fullmatch(r"\d+([+\-*][1-9])+", ex.question)
        assert len(ex.steps) == n_ops
        values = _reference(ex.question, modulus)
        assert step_results(ex) == [str(v) for v in values]
        assert ex.answer == str(values[-1])
        assert 0 <= int(ex.answer) < modulus
        assert is_correct(f"The answer is {ex.answer}", ex.answer)
        assert example_from_record(example_to_record(ex), "x") == ex  # valid under the schema
        assert ex.source_id.startswith(f"synthetic-{style}-s3-")


def test_step_formats() -> None:
    eq = generate(50, seed=0)
    nl = generate(50, seed=0, style="nl")
    assert [e.question for e in eq] == [e.question for e in nl]
    words = {"+": "plus", "-": "minus", "*": "times"}
    for e, n in zip(eq, nl):
        for s_eq, s_nl in zip(e.steps, n.steps):
            a, op, b, c = re.fullmatch(r"<<(\d+)([+\-*])(\d+)=(\d+)>>", s_eq).groups()  # type: ignore[union-attr]
            assert s_nl == f"{a} {words[op]} {b} is {c}."


def test_exact_rendering() -> None:
    ex = Example("7*2-7-4*8", ("<<7*2=4>>", "<<4-7=7>>", "<<7-4=3>>", "<<3*8=4>>"), "4", "x")
    start, chain = 7, [("*", 2), ("-", 7), ("-", 4), ("*", 8)]
    from kava.data.synthetic import _example

    assert _example(start, chain, 10, "eq", "x") == ex
    assert _example(start, chain, 10, "nl", "x").steps == (
        "7 times 2 is 4.",
        "4 minus 7 is 7.",
        "7 minus 4 is 3.",
        "3 times 8 is 4.",
    )


def test_knobs() -> None:
    exs = generate(100, seed=1, ops="+", max_operand=3, n_ops=2)
    assert all(set(re.findall(r"[+\-*]", e.question)) == {"+"} for e in exs)
    assert all(int(x) <= 3 for e in exs for x in re.findall(r"[+](\d+)", e.question))
    with pytest.raises(ValueError, match="ops"):
        generate(1, 0, ops="/")
    with pytest.raises(ValueError, match="style"):
        generate(1, 0, style="latex")
    with pytest.raises(ValueError, match="modulus"):
        generate(1, 0, modulus=1)
    with pytest.raises(ValueError, match="n_ops"):
        generate(1, 0, n_ops=0)


def test_determinism_by_seed() -> None:
    assert generate(50, seed=11) == generate(50, seed=11)
    assert [e.question for e in generate(50, seed=11)] != [e.question for e in generate(50, seed=12)]
    assert generate_split("train", 40, seed=2) == generate_split("train", 40, seed=2)
    # a smaller draw is a prefix of a larger one
    assert generate_split("test", 10, seed=2) == generate_split("test", 30, seed=2)[:10]


def test_split_disjointness() -> None:
    train = generate_split("train", 3000, seed=0)
    valid = generate_split("valid", 300, seed=0)
    test = generate_split("test", 300, seed=0)
    q_train, q_valid, q_test = ({e.question for e in s} for s in (train, valid, test))
    assert len(q_train) == 3000 and len(q_valid) == 300 and len(q_test) == 300  # unique within a split
    assert not q_train & q_test and not q_train & q_valid and not q_valid & q_test
    assert all(split_of(q) == "test" for q in q_test)
    # disjoint across seeds too: membership is a property of the question
    other_train = {e.question for e in generate_split("train", 3000, seed=9)}
    assert not other_train & q_test
    assert test[0].source_id == "synthetic-eq-test-0"
    assert generate_split("test", 5, seed=0, style="nl")[0].source_id == "synthetic-nl-test-0"


def test_small_question_space_fails_loudly() -> None:
    # modulus 2, one op, operand 1: only 2 questions exist in total
    with pytest.raises(ValueError, match="distinct questions"):
        generate_split("train", 10, seed=0, modulus=2, n_ops=1, max_operand=1, ops="+")
    with pytest.raises(ValueError, match="split"):
        generate_split("dev", 1)


# --- sums of products ---------------------------------------------------------------------


def _products_reference(question: str, modulus: int = 10) -> int:
    """Independent evaluation: ordinary precedence (products first), then mod."""
    return eval(question, {"__builtins__": {}}) % modulus  # the question is digits, '*' and '+' only


@pytest.mark.parametrize("style", ["eq", "nl"])
def test_products_examples_are_consistent(style: str) -> None:
    from kava.data.synthetic import generate_products_split

    examples = generate_products_split("test", 300, style=style)
    for ex in examples:
        assert re.fullmatch(r"\d\*\d(\+\d(\*\d)?)+", ex.question) or re.fullmatch(r"\d\*\d\+\d", ex.question)
        assert int(ex.answer) == _products_reference(ex.question)
        results = step_results(ex)
        assert results[-1] == ex.answer and all(r is not None for r in results)
        k = ex.question.count("*")
        assert len(ex.steps) == (2 if k == 1 else 2 * k - 1)
        assert f"-k{k}-" in ex.source_id
        assert is_correct(f" The answer is: {ex.answer}", ex.answer, "strict")


def test_products_last_step_adds_two_values_the_kept_chain_shows() -> None:
    """What drop-last-step leaves the teacher: the final addition's operands are already written."""
    from kava.data.synthetic import generate_products_split

    for ex in generate_products_split("train", 200, style="eq"):
        a, b = re.fullmatch(r"<<(\d)\+(\d)=\d>>", ex.steps[-1]).groups()
        kept = step_results(Example(ex.question, ex.steps[:-1], ex.answer))
        assert a in kept  # the running total, or the product of a*b+c
        assert b in kept or (ex.question.count("*") == 1 and ex.question.endswith(b))  # a product, or c of a*b+c


def test_products_worked_examples() -> None:
    from kava.data.synthetic import products_example

    one = products_example((7, 2, 3), "eq", "x")
    assert (one.question, one.steps, one.answer) == ("7*2+3", ("<<7*2=4>>", "<<4+3=7>>"), "7")
    three = products_example((7, 2, 3, 4, 5, 6), "eq", "x")
    assert three.steps == ("<<7*2=4>>", "<<3*4=2>>", "<<5*6=0>>", "<<4+2=6>>", "<<6+0=6>>") and three.answer == "6"
    nl = products_example((7, 2, 3, 4), "nl", "x")
    assert nl.steps == ("7 times 2 is 4.", "3 times 4 is 2.", "4 plus 2 is 6.")
    with pytest.raises(ValueError, match="3 digits or an even number"):
        products_example((1, 2, 3, 4, 5), "eq", "x")


def test_products_splits_are_disjoint_mixed_and_deterministic() -> None:
    from collections import Counter

    from kava.data.synthetic import generate_products_split

    train = generate_products_split("train", 6000)
    test = generate_products_split("test", 600)
    assert not {e.question for e in train} & {e.question for e in test}
    assert len({e.question for e in test}) == 600  # test questions never repeat
    sizes = Counter(e.question.count("*") for e in test)
    # a*b+c has only ~73 test questions: it takes all of them, the other sizes share the rest.
    assert 60 <= sizes[1] <= 90 and abs(sizes[2] - sizes[3]) <= 1 and sum(sizes.values()) == 600
    assert Counter(e.question.count("*") for e in train) == {1: 2000, 2: 2000, 3: 2000}  # repeats allowed in train
    assert [e.question for e in generate_products_split("test", 600)] == [e.question for e in test]
    assert [e.question for e in generate_products_split("test", 600, seed=1)] != [e.question for e in test]
    assert len({e.question.count("*") for e in test[:30]}) == 3  # shuffled: a prefix holds every size
    with pytest.raises(ValueError, match="distinct questions"):
        generate_products_split("test", 100, sizes=(1,))
    with pytest.raises(ValueError, match="sizes"):
        generate_products_split("test", 10, sizes=(0, 2))


def test_products_task_through_a_runs_config_and_the_registry(tmp_path) -> None:
    from kava.config import ConfigError, load_config
    from kava.data import load_data, load_examples

    cfg = load_config(
        None,
        [
            "data.train=synthetic-products-nl",
            "data.eval=synthetic-products",
            "data.synthetic_train_size=90",
            "data.synthetic_test_size=60",
            "data.synthetic_sizes=[2, 3]",
        ],
    )
    train, test = load_data(cfg, "train"), load_data(cfg, "eval")
    assert len(train) == 90 and len(test) == 60
    assert {e.question.count("*") for e in train + test} == {2, 3}
    assert all(" times " in e.steps[0] for e in train) and all(e.steps[0].startswith("<<") for e in test)
    listed = list(load_examples("synthetic-products?n=12&sizes=1+3", "test"))
    assert len(listed) == 12 and {e.question.count("*") for e in listed} == {1, 3}
    with pytest.raises(ConfigError, match="data.synthetic_sizes"):
        load_config(None, ["data.synthetic_sizes=[0]"])
    with pytest.raises(ValueError, match="sizes"):
        list(load_examples("synthetic-products?sizes=x", "test"))

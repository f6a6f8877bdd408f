"""The testbed in the paper's regime: sums of products with splits disjoint by equivalence class,
verbose natural-language traces, and counterfactual chains that change step results only."""

from __future__ import annotations

import random

import pytest

from kava.answers import number_spans
from kava.data.counterfactual import counterfactual_example, counterfactual_steps, derangement
from kava.data.loaders import load_examples
from kava.data.schema import Example, result_span, step_result
from kava.data.synthetic import (
    class_of,
    classes_example,
    generate_classes_split,
    generate_products_split,
    parse_products_question,
    products_example,
)
from kava.model.tokenizer import build_synthetic_tokenizer


def _reference_class(question: str) -> frozenset:
    """An independent canonical form: the multiset of terms, each the multiset of its factors."""
    terms = [tuple(sorted(t.split("*"))) for t in question.split("+")]
    return frozenset((t, terms.count(t)) for t in terms)


def test_class_of_ignores_order_of_terms_and_factors_only():
    assert class_of("8*4+7*2") == class_of("2*7+4*8") == class_of("7*2+8*4") == "2*7+4*8"
    assert class_of("7*2+4*8") != class_of("7*4+2*8")  # other products
    assert class_of("1*1+1*2") != class_of("1*2+1*2")  # multiplicity counts


@pytest.mark.parametrize("style", ["eq", "verbose"])
def test_no_test_question_is_equivalent_to_a_training_question(style):
    train = generate_classes_split("train", 20000, style=style)
    test = generate_classes_split("test", 700, style=style)
    valid = generate_classes_split("valid", 700, style=style)
    assert len(test) >= 500 and len({e.question for e in test}) == len(test)
    train_classes = {_reference_class(e.question) for e in train}
    assert not train_classes & {_reference_class(e.question) for e in test}
    assert not train_classes & {_reference_class(e.question) for e in valid}
    assert not {_reference_class(e.question) for e in test} & {_reference_class(e.question) for e in valid}
    # The old testbed's text-disjoint splits do have such pairs (why this one exists).
    old_train = {_reference_class(e.question) for e in generate_products_split("train", 20000, sizes=(2,))}
    assert (
        sum(_reference_class(e.question) in old_train for e in generate_products_split("test", 600, sizes=(2,))) > 300
    )


def test_both_styles_ask_the_same_questions_with_correct_answers():
    eq = generate_classes_split("test", 300, seed=3, sizes=(2, 3))
    nl = generate_classes_split("test", 300, seed=3, sizes=(2, 3), style="verbose")
    assert [e.question for e in eq] == [e.question for e in nl] and [e.answer for e in eq] == [e.answer for e in nl]
    for e in eq:
        terms = [t.split("*") for t in e.question.split("+")]
        assert int(e.answer) == sum(int(a) * int(b) for a, b in terms) % 10
    small = generate_classes_split("test", 700)  # a*b+c has only 70 questions in test: it takes them all
    assert sum(len(e.steps) == 2 for e in small) == 70 and sum(len(e.steps) == 3 for e in small) == 630
    with pytest.raises(ValueError, match="distinct questions"):
        generate_classes_split("test", 800)
    assert {len(e.steps) for e in eq} == {3, 5}  # two and three products, shared evenly
    assert sum(len(e.steps) == 3 for e in eq) == 150


def test_equation_and_short_styles_are_the_products_tasks_own():
    rng = random.Random(0)
    for _ in range(300):
        k = rng.choice([1, 2, 3, 4])
        digits = tuple(rng.randint(1, 9) for _ in range(3 if k == 1 else 2 * k))
        for style in ("eq", "nl"):
            assert classes_example(digits, style, "") == products_example(digits, style, "")
        assert parse_products_question(products_example(digits, "eq", "").question) == digits


def test_verbose_traces_restate_operands_and_end_in_the_result():
    for e in generate_classes_split("train", 500, sizes=(1, 2, 3), style="verbose"):
        digits = parse_products_question(e.question)
        eq = classes_example(digits, "eq", "")
        for i, (nl_step, eq_step) in enumerate(zip(e.steps, eq.steps)):
            assert step_result(nl_step) == step_result(eq_step)  # the result is the step's last number
            inner = eq_step[2:-2].split("=")[0]
            for operand in inner.replace("*", " ").replace("+", " ").split():
                assert operand in nl_step  # what the step combines is written out
            if "*" in inner:  # a product is written in full before its last digit
                a, b = map(int, inner.split("*"))
                assert str(a * b) in nl_step
    wordings = {
        e.steps[0].split(" ")[0] + str(len(e.steps[0])) for e in generate_classes_split("train", 200, style="verbose")
    }
    assert len(wordings) > 4  # the wording varies from question to question


def test_kept_verbose_chain_is_at_least_four_times_the_latents():
    """With the last step dropped (the teacher's CoT), 95% of examples keep >= 4 x M tokens, M = 6."""
    tok = build_synthetic_tokenizer(verbose=True)
    examples = generate_classes_split("train", 2000, style="verbose")
    kept = []
    for e in examples:
        ids = tok(" ".join(e.steps[:-1]), add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in tok(" ".join(e.steps), add_special_tokens=False)["input_ids"]
        kept.append(len(ids))
    assert sorted(kept)[int(0.05 * len(kept))] >= 4 * 6
    eq_kept = [
        len(tok(" ".join(e.steps[:-1]), add_special_tokens=False)["input_ids"])
        for e in generate_classes_split("train", 2000)
    ]
    assert sum(kept) > 1.8 * sum(eq_kept)  # the verbose traces are the long ones


def test_verbose_tokenizer_keeps_every_word_tokenizer_id():
    plain, verbose = build_synthetic_tokenizer(), build_synthetic_tokenizer(verbose=True)
    assert len(verbose) > len(plain)
    assert all(verbose.get_vocab()[t] == i for t, i in plain.get_vocab().items())


def test_registered_datasets_load_both_styles():
    eq = load_examples("synthetic-classes", "test", limit=20)
    nl = load_examples("synthetic-classes-nl", "test", limit=20)
    assert [e.question for e in eq] == [e.question for e in nl] and len(eq) == 20
    assert load_examples("synthetic-classes?sizes=3&n=10", "valid")[0].steps.__len__() == 5


def _question_operands(ex: Example) -> list[str]:
    return [d for term in ex.question.split("+") for d in term.split("*")]


@pytest.mark.parametrize("style", ["eq", "nl", "verbose"])
def test_counterfactual_changes_step_results_only(style):
    """Every result changes and is carried forward; every operand copied from the question stays,
    even where it equals an earlier result (which the text-only rule would change)."""
    rng = random.Random(1)
    collisions = 0
    for _ in range(400):
        k = rng.choice([1, 2, 3])
        digits = tuple(rng.randint(1, 9) for _ in range(3 if k == 1 else 2 * k))
        ex = classes_example(digits, style, f"id{_}")
        cf = counterfactual_example(ex, seed=0)
        assert cf.question == ex.question and cf.answer == ex.answer and len(cf.steps) == len(ex.steps)
        assert [len(s) for s in cf.steps] == [len(s) for s in ex.steps]
        eq_true = classes_example(digits, "eq", "").steps
        results = [step_result(s) for s in eq_true]
        assert all(step_result(a) != step_result(b) for a, b in zip(ex.steps, cf.steps))
        n_products = k if k > 1 else 1
        for i in range(n_products):  # a product step keeps the question's factors
            a, b = digits[2 * i], digits[2 * i + 1]
            spans = number_spans(ex.steps[i])  # every style writes the two factors first
            assert [ex.steps[i][x:y] for x, y in spans[:2]] == [str(a), str(b)]
            assert [cf.steps[i][x:y] for x, y in spans[:2]] == [str(a), str(b)]
            assert all(c == d or c.isdigit() for c, d in zip(cf.steps[i], ex.steps[i]))  # only numbers change
        collisions += any(str(d) in results[:i] for i, d in enumerate(digits[::2]))
        # Recomputing the counterfactual chain from its own text: the sums add the mapped values.
        cf_eq = counterfactual_example(classes_example(digits, "eq", f"id{_}"), seed=0).steps
        vals = [int(step_result(s)) for s in cf_eq]
        for i, s in enumerate(cf_eq[n_products:], start=n_products):
            x, y = s[2:-2].split("=")[0].split("+")
            assert int(x) == vals[0 if i == n_products else i - 1]  # the previous (mapped) result
            assert int(y) == (
                digits[2] if k == 1 else vals[i - n_products + 1]
            )  # the question's c, or a mapped product
    assert collisions > 20  # question factors equal to earlier results do occur, and stay


def test_text_rule_still_serves_other_chains():
    shift = {str(i): str((i + 1) % 10) for i in range(10)}
    ex = Example("Tom has 3 bags of 4 apples and eats 2.", ("3 times 4 is 12.", "12 minus 2 is 10."), "10", "x")
    cf = counterfactual_example(ex)
    assert cf.steps != ex.steps and step_result(cf.steps[0]) != "12"
    assert counterfactual_steps(list(ex.steps), shift) == ["3 times 4 is 23.", "23 minus 2 is 21."]
    assert len(derangement(random.Random(0))) == 10
    # The old testbed's chains are rebuilt too: their product steps keep the question's factors.
    for e in generate_products_split("train", 200, sizes=(1, 2)):
        cf = counterfactual_example(e)
        assert cf.steps[0][: result_span(cf.steps[0])[0]] == e.steps[0][: result_span(e.steps[0])[0]]

"""The one grader: number extraction and correctness."""

from __future__ import annotations

import math

import pytest

from kava.answers import GRADERS, extract_number, find_numbers, format_number, is_correct, parse_number

EXTRACT_CASES = [
    # plain numbers, signs, decimals
    ("42", 42.0),
    ("-7", -7.0),
    ("+7", 7.0),
    ("x = -5 apples", -5.0),
    ("\u22123", -3.0),
    ("3.25", 3.25),
    (".5", 0.5),
    ("-0.75 meters", -0.75),
    # last number wins without a marker
    ("She had 3 apples and bought 4 more, so 7", 7.0),
    ("10 - 3 = 7", 7.0),
    ("7-4", 4.0),
    ("<<7*2=4>>", 4.0),
    # thousands separators; separated digits do not merge
    ("It costs 1,234 dollars", 1234.0),
    ("1,234,567.5", 1234567.5),
    ("1 234", 234.0),
    ("1,2,3", 3.0),
    # fractions, currency, percent, trailing punctuation
    ("3/4", 0.75),
    ("so 3/4.", 0.75),
    ("-1/2", -0.5),
    ("$5", 5.0),
    ("$1,250.50 in total", 1250.5),
    ("-$5", -5.0),
    ("$-5", -5.0),
    ("50%", 50.0),
    ("it is 5 %", 5.0),
    ("The total is 12.", 12.0),
    ("Done: 12!", 12.0),
    # markers are preferred over the last number
    ("#### 72", 72.0),
    ("First 48/2=24 then 24+48=72\n#### 72\nBonus: 9", 72.0),
    ("#### -1,000", -1000.0),
    ("The answer is 5. Then 7 more", 5.0),
    ("The answer is: $1,234.56.", 1234.56),
    ("the final answer is 18 eggs, not 20", 18.0),
    ("The answer is 3/4.", 0.75),
    ("\\boxed{42} and 7", 42.0),
    ("#### nothing numeric here, but 9 earlier", 9.0),
    # no number
    ("no number", None),
    ("", None),
    ("The answer is unknown", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_extract_number(text: str, expected: float | None) -> None:
    got = extract_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, expected, rel_tol=1e-12, abs_tol=1e-12)


def test_case_table_is_large() -> None:
    assert len(EXTRACT_CASES) >= 25


def test_extract_rejects_non_text() -> None:
    with pytest.raises(TypeError):
        extract_number(12)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prediction", "gold", "ok"),
    [
        ("The answer is 18", 18, True),
        ("The answer is 18", "18", True),
        ("#### 18", 18.0, True),
        ("18.0000001", 18, True),  # within rel 1e-6
        ("18.1", 18, False),
        ("The answer is 1,234", "1234", True),
        ("The answer is 1234", "1,234", True),
        ("It is 0.75", "3/4", True),
        ("It is 3/4", 0.75, True),
        ("I don't know", 5, False),
        ("-3", -3, True),
        ("3", -3, False),
        ("50%", "50", True),
        ("#### 2.6666666666666665", 2.6666666666666665, True),
        ("0.0000001", 0, True),  # abs tolerance 1e-6
    ],
)
def test_is_correct(prediction: str, gold: float | int | str, ok: bool) -> None:
    assert is_correct(prediction, gold) is ok


def test_is_correct_bad_gold() -> None:
    with pytest.raises(ValueError):
        is_correct("5", "no number")
    with pytest.raises(TypeError):
        is_correct("1", True)


def test_helpers() -> None:
    assert find_numbers("4 minus 7 is $1,234.") == ["4", "7", "$1,234"]
    assert parse_number("1,234") == 1234.0
    assert parse_number("12 apples") is None
    assert format_number(18.0) == "18"
    assert format_number(2.5) == "2.5"
    assert format_number(1e20) == "100000000000000000000"
    assert format_number(7) == "7"
    assert extract_number(format_number(1e-7)) == pytest.approx(1e-7)


# (text, strict, flexible): strict reads only a number right after an answer marker.
GRADER_CASES = [
    # a chain of thought cut off at the token cap: no final answer
    ("<<7*2=4>> <<4-7=7>> 23 * 6 =", None, 6.0),
    ("She had 3 apples and bought 4 more, so 7", None, 7.0),
    ("42", None, 42.0),
    ("", None, None),
    # marker variants
    ("The answer is 18", 18.0, 18.0),
    ("The answer is: 18", 18.0, 18.0),
    ("The answer is : 18", 18.0, 18.0),
    (" The answer is:18", 18.0, 18.0),
    ("the final answer is 18 eggs, not 20", 18.0, 18.0),
    ("First 48/2=24 then 24+48=72\n#### 72", 72.0, 72.0),
    ("\\boxed{42} and 7", 42.0, 42.0),
    # signs, thousands separators, decimals, currency, fractions after a marker
    ("The answer is: -1,234", -1234.0, -1234.0),
    ("#### 1,234,567.5", 1234567.5, 1234567.5),
    ("The answer is $1,250.50.", 1250.5, 1250.5),
    ("The answer is -$5", -5.0, -5.0),
    ("\\boxed{-3/4}", -0.75, -0.75),
    ("The answer is 0.5 liters", 0.5, 0.5),
    # a marker not followed by a number: strict has no answer, flexible reads on
    ("The answer is unknown, 9", None, 9.0),
    ("#### nothing numeric here, but 9 earlier", None, 9.0),
    # only the last occurrence of a marker counts: a repeat cut off at the cap loses
    ("The answer is: 5. The answer is: 7", 7.0, 7.0),
    ("The answer is: 5. The answer is", None, 5.0),
    # a stronger marker without a number falls back to a weaker one
    ("#### The answer is 6", 6.0, 6.0),
]


@pytest.mark.parametrize(("text", "strict", "flexible"), GRADER_CASES)
def test_graders(text: str, strict: float | None, flexible: float | None) -> None:
    for grader, expected in (("strict", strict), ("flexible", flexible)):
        got = extract_number(text, grader)
        if expected is None:
            assert got is None, grader
        else:
            assert got is not None and math.isclose(got, expected, rel_tol=1e-12), grader
    assert extract_number(text) == extract_number(text, "flexible")  # flexible is the default


def test_truncated_cot_is_wrong_only_under_strict() -> None:
    cut = "<<7*2=4>> <<4-7=7>> <<7-4=3>> 23 * 6 ="
    assert is_correct(cut, 6, "flexible") is True
    assert is_correct(cut, 6) is True  # today's behaviour stays the default
    assert is_correct(cut, 6, "strict") is False
    done = cut + " 8. The answer is: 8"
    assert is_correct(done, 8, "strict") and is_correct(done, 8, "flexible")
    assert not is_correct(done, 6, "strict")


def test_graded_against_gold_with_commas_and_sign() -> None:
    assert is_correct("The answer is: 1,234", "1234", "strict")
    assert is_correct("#### -1,000", "-1,000", "strict")
    assert not is_correct("The answer is: 1,234", "-1234", "strict")
    assert not is_correct("It costs 1,234", "1234", "strict")
    assert is_correct("It costs 1,234", "1234", "flexible")


def test_marker_given_by_the_run() -> None:
    """A run whose answer prefix is not a built-in marker passes it as `marker`."""
    text = "Answer: 12"
    assert extract_number(text, "strict") is None
    assert extract_number(text, "strict", marker=" Answer:") == 12.0
    assert extract_number("  Answer:\n 12", "strict", marker="Answer:") == 12.0
    assert is_correct(text, 12, "strict", marker=" Answer:")
    # the run's marker is the strongest: it wins over a built-in one
    assert extract_number("#### 3 Answer: 12", "strict", marker="Answer:") == 12.0
    assert extract_number("#### 3 Answer: 12", "strict") == 3.0
    # blank markers are ignored
    assert extract_number("#### 3", "strict", marker="  ") == 3.0


def test_unknown_grader() -> None:
    assert GRADERS == ("strict", "flexible")
    with pytest.raises(ValueError, match="unknown grader"):
        extract_number("#### 3", "lenient")
    with pytest.raises(ValueError, match="unknown grader"):
        is_correct("#### 3", 3, "lenient")


@pytest.mark.parametrize("answer", ["4", "0", "1,234", "-3.5", "$5", "50%", "3/4", "1000000"])
def test_strict_accepts_the_trained_answer_format(answer: str) -> None:
    """What every mode is trained to produce, answer prefix + answer template, has a strict answer."""
    from kava.config import DataConfig

    data = DataConfig()
    target = data.answer_prefix + data.answer_template.format(answer=answer)
    assert is_correct(target, answer, "strict")
    assert is_correct("<<7*2=4>> <<4-7=7>>" + target, answer, "strict")  # after a chain of thought

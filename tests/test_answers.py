"""The one grader: number extraction and correctness."""

from __future__ import annotations

import math

import pytest

from kava.answers import extract_number, find_numbers, format_number, is_correct, parse_number

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

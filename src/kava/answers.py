"""The one answer extractor and grader used everywhere in kava.

`extract_number` pulls the final numeric answer out of model output or dataset text;
`is_correct` compares it to a gold value as floats. No other copy of this logic may exist:
evaluation, data validation and step parsing all import it from here.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction

__all__ = ["extract_number", "find_numbers", "format_number", "is_correct", "parse_number"]

# One number as written in text: optional sign, optional currency symbol, an integer part
# with or without thousands separators (or a bare decimal like ".5"), an optional decimal
# part, an optional "/denominator" and an optional percent sign.  A sign only counts when it
# does not follow a word character or closing bracket ("7-4" is 7 then 4, not 7 and -4).
_NUMBER_RE = re.compile(
    r"""
    (?:(?<![\w)\]])(?P<sign>[-+\u2212]))?    # sign, unless it is a binary operator
    (?P<cur>\$\s?)?                           # currency
    (?:(?<=\$)(?P<sign2>[-\u2212]))?          # "$-5"
    (?<!\d)                                   # never start inside another number
    (?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)?    # 1,234 or 1234
    (?P<frac>\.\d+)?                          # .5
    (?:/(?P<den>\d+)(?!\d|\.\d|,\d))?          # /4
    (?P<pct>\s?%)?                            # %
    """,
    re.VERBOSE,
)

# Markers that announce the final answer, strongest first.
_MARKERS: tuple[re.Pattern[str], ...] = (
    re.compile(r"####"),
    re.compile(r"\\boxed\{"),
    re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?", re.IGNORECASE),
)

_TOL = 1e-6


def _value(match: re.Match[str]) -> float | None:
    """Numeric value of one `_NUMBER_RE` match (None when it is not a number)."""
    int_part = match.group("int") or ""
    frac_part = match.group("frac") or ""
    if not int_part and not frac_part:
        return None
    value = Fraction((int_part or "0").replace(",", "") + frac_part)
    den = match.group("den")
    if den is not None and int(den) != 0:
        value = value / int(den)
    if match.group("sign") in ("-", "\u2212") or match.group("sign2"):
        value = -value
    return float(value)


def _matches(text: str) -> list[re.Match[str]]:
    return [m for m in _NUMBER_RE.finditer(text) if m.group("int") or m.group("frac")]


def find_numbers(text: str) -> list[str]:
    """Every number in `text`, as written (sign, currency and percent stripped of spaces)."""
    return [m.group(0).strip() for m in _matches(text)]


def parse_number(token: str) -> float | None:
    """Parse a text that is exactly one number ("1,234", "-3/4", "$5", "50%"); else None."""
    token = token.strip().rstrip(".")
    match = _NUMBER_RE.fullmatch(token)
    if match is None:
        return None
    return _value(match)


def extract_number(text: str) -> float | None:
    """The final numeric answer in `text`, or None when it holds no number.

    The first number after the last answer marker (``####``, ``\\boxed{``,
    "The answer is", "The answer is:") wins; without a marker (or with nothing numeric
    after it) the last number in the text is used. Handles signs, decimals, thousands
    separators (1,234), fractions (3/4 -> 0.75), currency ($5) and percent (50% -> 50).
    Digits separated by spaces are separate numbers.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_number expects a str, got {type(text).__name__}")
    for marker in _MARKERS:
        positions = [m.end() for m in marker.finditer(text)]
        if not positions:
            continue
        found = _matches(text[positions[-1]:])
        if found:
            return _value(found[0])
    found = _matches(text)
    if not found:
        return None
    return _value(found[-1])


def format_number(value: float | int) -> str:
    """Canonical text of a number: integers without ".0", no scientific notation."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"format_number expects a number, got {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        raise ValueError(f"cannot format non-finite number {value!r}")
    if value.is_integer():
        return str(int(value))
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _gold_value(gold: float | int | str) -> float:
    if isinstance(gold, bool):
        raise TypeError("gold answer must be a number or a string, got bool")
    if isinstance(gold, (int, float)):
        return float(gold)
    if isinstance(gold, str):
        try:
            return float(gold.strip().replace(",", ""))
        except ValueError:
            value = extract_number(gold)
            if value is None:
                raise ValueError(f"gold answer {gold!r} holds no number") from None
            return value
    raise TypeError(f"gold answer must be a number or a string, got {type(gold).__name__}")


def is_correct(prediction_text: str, gold: float | int | str) -> bool:
    """True when the number extracted from `prediction_text` equals `gold` as a float.

    Tolerance: ``math.isclose(rel_tol=1e-6, abs_tol=1e-6)``. A prediction without a
    number is wrong; a gold value without a number raises ValueError (a data bug).
    """
    gold_value = _gold_value(gold)
    predicted = extract_number(prediction_text)
    if predicted is None or not math.isfinite(predicted):
        return False
    return math.isclose(predicted, gold_value, rel_tol=_TOL, abs_tol=_TOL)

"""The one answer extractor and grader used everywhere in kava.

`extract_number` pulls the final numeric answer out of model output or dataset text;
`is_correct` compares it to a gold value as floats. No other copy of this logic may exist:
evaluation, data validation and step parsing all import it from here.

Two graders (:data:`GRADERS`), as evaluation harnesses offer them for GSM8k:

* ``strict``: only an explicit final answer counts, a number right after an answer marker
  ("The answer is N", "The answer is: N", "#### N", ``\\boxed{N}``). Without one there is
  no answer, so a chain of thought cut off at the token cap ("... 23 * 6 =") is wrong.
  Evaluation reports this one as its headline accuracy.
* ``flexible``: the first number after the last marker, else the last number anywhere.
  The default of every function here, and what dataset text is parsed with.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache

__all__ = ["GRADERS", "extract_number", "find_numbers", "format_number", "is_correct", "number_spans", "parse_number"]

GRADERS = ("strict", "flexible")

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
MAX_NUMBER_DIGITS = 1000  # a longer "number" is not a number here


def _value(match: re.Match[str]) -> float | None:
    """Numeric value of one `_NUMBER_RE` match (None when it is not a number)."""
    int_part = match.group("int") or ""
    frac_part = match.group("frac") or ""
    if not int_part and not frac_part:
        return None
    den = match.group("den")
    if len(int_part) + len(frac_part) + len(den or "") > MAX_NUMBER_DIGITS:
        return None  # (Python refuses to read integers of over 4,300 digits; no answer is that long)
    value = Fraction((int_part or "0").replace(",", "") + frac_part)
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


def number_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character span of the digits of every number in `text` (integer part to
    denominator; sign, currency and percent left out), in the order :func:`find_numbers` gives."""
    out = []
    for m in _matches(text):
        parts = [m.span(g) for g in ("int", "frac", "den") if m.group(g)]
        out.append((parts[0][0], parts[-1][1]))
    return out


def parse_number(token: str) -> float | None:
    """Parse a text that is exactly one number ("1,234", "-3/4", "$5", "50%"); else None."""
    token = token.strip().rstrip(".")
    match = _NUMBER_RE.fullmatch(token)
    if match is None:
        return None
    return _value(match)


@lru_cache(maxsize=32)
def _marker_patterns(marker: str | None) -> tuple[re.Pattern[str], ...]:
    """The answer markers, strongest first: `marker` (when given), then the built-in ones.

    `marker` is literal text such as a run's answer prefix (" The answer is:"); surrounding
    whitespace is ignored and any run of inner whitespace matches any other.
    """
    words = marker.split() if marker else []
    if not words:
        return _MARKERS
    return (re.compile(r"\s+".join(map(re.escape, words))), *_MARKERS)


def _number_right_after(text: str) -> float | None:
    """The value of the number `text` starts with (after whitespace), else None."""
    match = _NUMBER_RE.match(text.lstrip())
    if match is None or not (match.group("int") or match.group("frac")):
        return None
    return _value(match)


def _marked_answer(text: str, markers: tuple[re.Pattern[str], ...], right_after: bool) -> float | None:
    """The number after the last occurrence of the strongest marker that has one.

    With `right_after` the number must follow the marker with only whitespace between
    (strict); without, the first number anywhere after the marker counts (flexible).
    """
    for marker in markers:
        positions = [m.end() for m in marker.finditer(text)]
        if not positions:
            continue
        tail = text[positions[-1] :]
        if right_after:
            value = _number_right_after(tail)
            if value is not None:
                return value
            continue
        found = _matches(tail)
        if found:
            return _value(found[0])
    return None


def extract_number(text: str, grader: str = "flexible", *, marker: str | None = None) -> float | None:
    """The final numeric answer in `text` under `grader`, or None when it gives none.

    Answer markers, strongest first: `marker` (e.g. the run's ``data.answer_prefix``, when
    given), ``####``, ``\\boxed{``, "The answer is", "The answer is:" (also "the final
    answer is"). Only the last occurrence of a marker is read.

    * ``grader="flexible"`` (default): the first number after the marker wins; without a
      marker (or with nothing numeric after it) the last number in the text is used.
    * ``grader="strict"``: the number must come right after the marker (only whitespace
      between); without such a marker the text has no answer (None).

    Handles signs, decimals, thousands separators (1,234), fractions (3/4 -> 0.75),
    currency ($5) and percent (50% -> 50). Digits separated by spaces are separate numbers.
    """
    if not isinstance(text, str):
        raise TypeError(f"extract_number expects a str, got {type(text).__name__}")
    if grader not in GRADERS:
        raise ValueError(f"unknown grader {grader!r}; choose from {', '.join(GRADERS)}")
    strict = grader == "strict"
    value = _marked_answer(text, _marker_patterns(marker), right_after=strict)
    if value is not None or strict:
        return value
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


def is_correct(
    prediction_text: str, gold: float | int | str, grader: str = "flexible", *, marker: str | None = None
) -> bool:
    """True when the number `grader` extracts from `prediction_text` equals `gold` as a float.

    `grader` and `marker` are those of :func:`extract_number` (the gold value itself is
    always read flexibly). Tolerance: ``math.isclose(rel_tol=1e-6, abs_tol=1e-6)``. A
    prediction without an answer is wrong; a gold value without a number raises ValueError
    (a data bug).
    """
    gold_value = _gold_value(gold)
    predicted = extract_number(prediction_text, grader, marker=marker)
    if predicted is None or not math.isfinite(predicted):
        return False
    return math.isclose(predicted, gold_value, rel_tol=_TOL, abs_tol=_TOL)

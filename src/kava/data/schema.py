"""The one example schema every dataset is mapped onto, and its validation.

A record on disk (JSONL line, JSON list item, parquet row) looks like::

    {"question": "...", "steps": ["<<10/5=2>>", ...], "answer": "2", "source_id": "..."}

`steps` may be empty (evaluation-only sets); `answer` must be exactly one number in the
grammar of `kava.answers` ("12", "-3.5", "1,234", "3/4", "$5", "50%"); `source_id` is
optional.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kava.answers import find_numbers, format_number, number_spans, parse_number

__all__ = [
    "DataError",
    "Example",
    "answer_text",
    "example_from_record",
    "example_to_record",
    "parse_gsm8k_solution",
    "result_span",
    "step_result",
    "step_results",
]

_ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")


@dataclass(frozen=True)
class Example:
    """One reasoning example: question, chain-of-thought steps, final answer."""

    question: str
    steps: tuple[str, ...]
    answer: str
    source_id: str = field(default="")

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple):
            object.__setattr__(self, "steps", tuple(self.steps))


class DataError(ValueError):
    """A bad record; its message is one line: ``WHERE: field 'F': REASON``.

    `where` is ``path:N`` with N the 1-based line (JSONL) or record number (JSON, parquet,
    hub rows). Mapping functions raise it without `where`; loaders add it with `at`.
    """

    def __init__(self, reason: str, *, where: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.where = where
        self.field = field
        parts = []
        if where:
            parts.append(where)
        if field:
            parts.append(f"field {field!r}")
        parts.append(reason)
        super().__init__(": ".join(parts).replace("\n", " "))

    def at(self, where: str) -> DataError:
        """The same error located at `where` (kept if already located)."""
        if self.where:
            return self
        return DataError(self.reason, where=where, field=self.field)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def answer_text(value: Any, *, field_name: str = "answer") -> str:
    """Normalise an answer value (str or number) to text that is exactly one number.

    Numbers are formatted canonically ("18", not "18.0"); text is kept as written, so the
    model learns the dataset's own answer format, and graded by `kava.answers.is_correct`.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"expected a string or a number, got {_type_name(value)}", field=field_name)
    if isinstance(value, str):
        text = value.strip()
    else:
        try:
            text = format_number(value)
        except ValueError as err:
            raise DataError(str(err), field=field_name) from None
    if len(text) > MAX_ANSWER_CHARS:
        raise DataError(
            f"{len(text)} characters long; an answer is one number of at most {MAX_ANSWER_CHARS}", field=field_name
        )
    if parse_number(text) is None:
        raise DataError(f"not a number: {_short(value)}", field=field_name)
    return text


MAX_ANSWER_CHARS = 100


def _check_unicode(text: str, where: str, field: str) -> None:
    """Refuse a lone UTF-16 surrogate (JSON's ``"\\ud800"``): no file can hold it as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(
            f"a lone surrogate {text[err.start]!r} at character {err.start} (not valid Unicode text)",
            where=where,
            field=field,
        ) from None


def example_from_record(record: Mapping[str, Any], where: str) -> Example:
    """Validate one record in our schema and build an `Example`; raise `DataError`."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a JSON object, got {_type_name(record)}", where=where)
    for name in ("question", "answer"):
        if name not in record:
            raise DataError("missing", where=where, field=name)
    question = record["question"]
    if not isinstance(question, str):
        raise DataError(f"expected a string, got {_type_name(question)}", where=where, field="question")
    if not question.strip():
        raise DataError("empty", where=where, field="question")
    steps = record.get("steps", [])
    if steps is None:
        steps = []
    if not isinstance(steps, (list, tuple)) or not all(isinstance(s, str) for s in steps):
        got = _type_name(steps) if not isinstance(steps, (list, tuple)) else "a list with a non-string item"
        raise DataError(f"expected a list of strings, got {got}", where=where, field="steps")
    try:
        answer = answer_text(record["answer"])
    except DataError as err:
        raise err.at(where) from None
    source_id = record.get("source_id")
    if source_id is not None and not isinstance(source_id, str):
        raise DataError(f"expected a string, got {_type_name(source_id)}", where=where, field="source_id")
    _check_unicode(question, where, "question")
    for i, s in enumerate(steps):
        _check_unicode(s, where, f"steps[{i}]")
    _check_unicode(answer, where, "answer")
    if source_id:
        _check_unicode(source_id, where, "source_id")
    return Example(
        question=question.strip(),
        steps=tuple(s.strip() for s in steps),
        answer=answer,
        source_id=source_id or where,
    )


def example_to_record(ex: Example) -> dict[str, Any]:
    """The JSON-ready record of an example (inverse of `example_from_record`)."""
    return {"question": ex.question, "steps": list(ex.steps), "answer": ex.answer, "source_id": ex.source_id}


def step_result(step: str) -> str | None:
    """The result a step states: for ``<<a*b=c>>`` it is c (text after the last '=' in
    the last annotation); otherwise the last number in the step; None when there is none."""
    annotations = _ANNOTATION_RE.findall(step)
    if annotations:
        inner = annotations[-1]
        if "=" in inner:
            result = inner.rsplit("=", 1)[1].strip()
            return result or None
    numbers = find_numbers(step)
    if not numbers:
        return None
    return numbers[-1].rstrip("%").strip()


def result_span(step: str) -> tuple[int, int] | None:
    """Where :func:`step_result` sits in ``step``: the ``(start, end)`` characters of the result
    (after the last '=' of the last annotation, stripped, or the digits of the last number);
    None when the step states none."""
    annotations = list(_ANNOTATION_RE.finditer(step))
    if annotations:
        m = annotations[-1]
        inner = m.group(1)
        if "=" in inner:
            start = m.start(1) + inner.rindex("=") + 1
            end = m.end(1)
            while start < end and step[start].isspace():
                start += 1
            while end > start and step[end - 1].isspace():
                end -= 1
            return (start, end) if end > start else None
    spans = number_spans(step)
    return spans[-1] if spans else None


def step_results(ex: Example) -> list[str | None]:
    """`step_result` of every step of `ex`."""
    return [step_result(s) for s in ex.steps]


def parse_gsm8k_solution(solution: str) -> tuple[list[str], list[str], str | None]:
    """Split a GSM8k-style solution text into (equation steps, NL steps, answer).

    Equation steps are the ``<<...>>`` annotations as written (brackets included); NL
    steps are the non-empty solution lines before ``####`` with the annotations removed;
    the answer is the text after the last ``####`` with thousands separators removed
    (None when there is no ``####``).
    """
    body, sep, tail = solution.rpartition("####")
    if not sep:
        body, tail = solution, ""
    eq_steps = [f"<<{inner}>>" for inner in _ANNOTATION_RE.findall(body)]
    nl_steps = _nl_lines(body.splitlines())
    answer = tail.strip().replace(",", "") if sep else None
    return eq_steps, nl_steps, answer or None


def _nl_lines(lines: Iterable[str]) -> list[str]:
    out = []
    for line in lines:
        text = re.sub(r"\s+", " ", _ANNOTATION_RE.sub("", line)).strip()
        if text:
            out.append(text)
    return out

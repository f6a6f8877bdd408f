"""Record layouts mapped onto kava's schema (question, steps, answer): pure functions, one per
layout, so each mapping is testable offline. :func:`map_auto` recognises a local record by its
fields: kava's own, TRL's ``messages`` and ``prompt``/``completion``, or GSM8k's raw
question/answer with ``#### N``; the others map one hub dataset's native fields each."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from kava.data.schema import DataError, answer_text, parse_gsm8k_solution

Record = Mapping[str, Any]
Mapper = Callable[[Record], dict[str, Any]]


def _field(record: Record, *names: str) -> Any:
    """The value of the first of `names` present in `record`; DataError if none is."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a record (object), got {type(record).__name__}")
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise DataError("missing", field=names[0])


def _text(record: Record, *names: str) -> str:
    value = _field(record, *names)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=names[0])
    return value


def map_gsm8k_aug(record: Record) -> dict[str, Any]:
    """whynlp/gsm8k-aug and gsm8k-aug-nl: fields question, steps (list), answer."""
    return {
        "question": _field(record, "question"),
        "steps": _field(record, "steps"),
        "answer": _field(record, "answer"),
    }


def map_gsm8k(record: Record, *, style: str = "eq") -> dict[str, Any]:
    """openai/gsm8k: question; answer is the solution text ending in ``#### N``.

    Steps are the ``<<...>>`` annotations (style "eq") or the solution lines without them
    (style "nl"); the answer is the text after ``####``.
    """
    solution = _text(record, "answer")
    eq_steps, nl_steps, answer = parse_gsm8k_solution(solution)
    if answer is None:
        raise DataError("no '#### N' final answer in the solution", field="answer")
    return {"question": _field(record, "question"), "steps": eq_steps if style == "eq" else nl_steps, "answer": answer}


_ANSWER_MARKER = re.compile(r"the answer is\s*:?", re.IGNORECASE)


def split_solution(text: str, field_name: str) -> tuple[list[str], str]:
    """A model's solution text -> (steps, answer). With GSM8k's ``#### N`` the answer follows
    it; else the last "The answer is" (kava's own prefix, any case, ':' optional) marks it. The
    CoT before the marker gives the steps: its ``<<...>>`` annotations when it has any (as for
    GSM8k), else its non-empty lines."""
    if "####" in text:
        eq_steps, nl_steps, answer = parse_gsm8k_solution(text)
        return (eq_steps or nl_steps), answer or ""
    marks = list(_ANSWER_MARKER.finditer(text))
    if not marks:
        raise DataError("no answer marker ('#### N' or 'The answer is: N') in the text", field=field_name)
    cot, answer = text[: marks[-1].start()], text[marks[-1].end() :].strip().rstrip(".").strip()
    eq_steps, nl_steps, _ = parse_gsm8k_solution(cot)
    return (eq_steps or nl_steps), answer


def _turn_text(turns: Any, role: str, field_name: str) -> str:
    """The content of the last ``role`` turn of a list of chat messages."""
    if not isinstance(turns, list) or not all(isinstance(t, Mapping) for t in turns):
        raise DataError("expected a list of {role, content} messages", field=field_name)
    found = [t.get("content") for t in turns if t.get("role") == role]
    if not found:
        raise DataError(f"no {role!r} message", field=field_name)
    if not isinstance(found[-1], str):
        raise DataError(f"the last {role!r} message's content is not a string", field=field_name)
    return found[-1]


def map_messages(record: Record) -> dict[str, Any]:
    """TRL's conversational layout ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}``:
    the question is the last user message; the last assistant message is the CoT, the answer
    marker and the answer (:func:`split_solution`)."""
    messages = _field(record, "messages")
    question = _turn_text(messages, "user", "messages")
    steps, answer = split_solution(_turn_text(messages, "assistant", "messages"), "messages")
    return {"question": question, "steps": steps, "answer": answer}


def map_prompt_completion(record: Record) -> dict[str, Any]:
    """TRL's prompt-completion layout: ``prompt`` (the question; text or a list of messages) and
    ``completion`` (CoT, answer marker and answer; text or a list of messages)."""
    prompt, completion = _field(record, "prompt"), _field(record, "completion")
    question = prompt if isinstance(prompt, str) else _turn_text(prompt, "user", "prompt")
    text = completion if isinstance(completion, str) else _turn_text(completion, "assistant", "completion")
    steps, answer = split_solution(text, "completion")
    return {"question": question, "steps": steps, "answer": answer}


def map_auto(record: Record) -> dict[str, Any]:
    """A record's layout recognised by its fields: ``messages``; ``prompt`` + ``completion``;
    ``question`` + a text ``answer`` holding ``####`` and no ``steps`` (GSM8k raw); else kava's
    schema (question, steps, answer), whose checks name what is missing."""
    if not isinstance(record, Mapping):
        raise DataError(f"expected a record (object), got {type(record).__name__}")
    if "messages" in record:
        return map_messages(record)
    if "prompt" in record and "completion" in record:
        return map_prompt_completion(record)
    if "steps" not in record and isinstance(record.get("answer"), str) and "####" in record["answer"]:
        return map_gsm8k(record)
    if not {"question", "answer", "steps"} & set(record):
        raise DataError(
            f"unknown record layout (fields: {', '.join(map(str, record)) or 'none'}); expected question/steps/"
            "answer, messages, prompt/completion, or GSM8k's question/answer with '#### N'"
        )
    return dict(record)


def map_gsm_hard(record: Record) -> dict[str, Any]:
    """reasoning-machines/gsm-hard: input (question), target (a float); no steps."""
    return {
        "question": _field(record, "input"),
        "steps": [],
        "answer": answer_text(_field(record, "target"), field_name="target"),
    }


def map_svamp(record: Record) -> dict[str, Any]:
    """ChilleD/SVAMP: question = Body + " " + Question, answer = Answer (any field case).

    Falls back to ``question_concat`` when Body/Question are absent; no steps.
    """
    keys = {k.lower(): k for k in record} if isinstance(record, Mapping) else {}
    body_key, question_key, answer_key = keys.get("body"), keys.get("question"), keys.get("answer")
    if question_key is not None:
        parts = [_text(record, body_key)] if body_key is not None else []
        parts.append(_text(record, question_key))
        question = " ".join(p.strip() for p in parts if p.strip())
    elif "question_concat" in keys:
        question = _text(record, keys["question_concat"])
    else:
        raise DataError("missing", field="Question")
    if answer_key is None:
        raise DataError("missing", field="Answer")
    return {"question": question, "steps": [], "answer": answer_text(record[answer_key], field_name=answer_key)}


def map_multiarith(record: Record) -> dict[str, Any]:
    """ChilleD/MultiArith (question, final_ans); also the original layout
    (sQuestion, lSolutions) and question/answer; no steps."""
    question = _field(record, "question", "sQuestion", "Question")
    if "final_ans" in record:
        answer = record["final_ans"]
        name = "final_ans"
    elif "lSolutions" in record:
        solutions = record["lSolutions"]
        if not isinstance(solutions, list) or not solutions:
            raise DataError("expected a non-empty list of numbers", field="lSolutions")
        answer, name = solutions[0], "lSolutions"
    else:
        answer, name = _field(record, "final_ans", "answer", "Answer"), "answer"
    return {"question": question, "steps": [], "answer": answer_text(answer, field_name=name)}

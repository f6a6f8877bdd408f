"""Token sequences for both modes, built from token ids so every span is exact.

Teacher: ``Q C A`` where ``A = answer_prefix answer <eos>``.
Student: ``Q <bot> z_1..z_m <eot> [remaining CoT steps] A``.

Each text piece is tokenised on its own (no special tokens) and the pieces are
concatenated, so a span is a sum of piece lengths: no re-tokenising, no BOS off-by-one.
Labels are stored *aligned with the logits*: ``labels[:, i]`` is the token that position
``i`` must predict (``-100`` where nothing is learned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import DataConfig
from .schema import Example, result_span, step_result

BOT = "<bot>"
EOT = "<eot>"
IGNORE = -100

TOKEN_TYPES = ("word", "digit", "result", "operator", "equals", "open", "close", "separator")
"""What a CoT token is (its code is its index; -1 outside the CoT): ``result`` holds a character
of its step's result (:func:`kava.data.schema.result_span`); ``digit`` any other digit; ``operator``
``+ - * / x`` or ``plus minus times divided``; ``equals`` ``=`` or the word ``is``/``equals``;
``open`` / ``close`` the ``<<`` / ``>>`` of an annotation; ``separator`` white space and
punctuation; ``word`` anything else."""
RESULT = TOKEN_TYPES.index("result")
_OPERATORS = {"+", "-", "*", "/", "x", "×", "÷", "−", "plus", "minus", "times", "divided", "by"}
_EQUALS = {"=", "is", "equals", "gives"}


def token_type(piece: str, is_result: bool) -> int:
    """The :data:`TOKEN_TYPES` code of a CoT token whose text is ``piece``."""
    if is_result:
        return RESULT
    text = piece.strip()
    if not text or all(not c.isalnum() and c not in "<>=+-*/" for c in text):
        return TOKEN_TYPES.index("separator")
    if text == "<<" or text == "<":
        return TOKEN_TYPES.index("open")
    if text == ">>" or text == ">":
        return TOKEN_TYPES.index("close")
    if text.lower() in _EQUALS:
        return TOKEN_TYPES.index("equals")
    if text.lower() in _OPERATORS:
        return TOKEN_TYPES.index("operator")
    if any(c.isdigit() for c in text):
        return TOKEN_TYPES.index("digit")
    return TOKEN_TYPES.index("word")


class SequenceError(ValueError):
    """An example that cannot be turned into a training sequence."""


@dataclass
class Encoded:
    """One example as token ids, piece by piece."""

    question: list[int]  # BOS (if the tokenizer adds one) + question, or the chat-templated prompt
    steps: list[list[int]]  # each CoT step, with its separator in front (except the first)
    answer_prefix: list[int]  # e.g. " The answer is:"; its last token is the CODI position
    answer: list[int]  # the answer and <eos>
    step_targets: list[int] = field(default_factory=list)  # first token of each step's result, or -100
    gold: str = ""
    source_id: str = ""
    example: Example | None = None  # the text it came from (a teacher with another tokenizer re-encodes it)
    # The TOKEN_TYPES code of every token of every step (empty: not known, e.g. a slow tokenizer)
    step_types: list[list[int]] = field(default_factory=list)


class TextEncoder:
    """Turns :class:`Example` objects into :class:`Encoded` ids for one tokenizer."""

    def __init__(self, tokenizer, data: DataConfig, use_chat_template: bool = False):
        self.tok = tokenizer
        self.cfg = data
        self.use_chat_template = use_chat_template
        if tokenizer.eos_token_id is None:
            raise SequenceError("the tokenizer has no eos token; set one before training")
        self.bot_id = tokenizer.convert_tokens_to_ids(BOT)
        self.eot_id = tokenizer.convert_tokens_to_ids(EOT)
        if self.bot_id == tokenizer.unk_token_id or self.eot_id == tokenizer.unk_token_id:
            raise SequenceError("the tokenizer lacks <bot>/<eot>; call kava.model.adapters.add_latent_tokens first")
        probe = tokenizer("1", add_special_tokens=True).input_ids
        self.bos = (
            [tokenizer.bos_token_id]
            if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
            else []
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.answer_prefix_ids = self.ids(data.answer_prefix)
        if not self.answer_prefix_ids:
            raise SequenceError("data.answer_prefix tokenises to nothing")

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids if text else []

    def question_ids(self, question: str) -> list[int]:
        """The prompt: BOS (if the tokenizer adds one) + question, or, with the chat template,
        the user turn and the assistant header, after which the CoT or ``<bot>`` follows."""
        text = self.cfg.question_template.format(question=question)
        if self.use_chat_template:
            if not getattr(self.tok, "chat_template", None):
                raise SequenceError("model.use_chat_template is set but the tokenizer has no chat template")
            # Render to text and tokenise without special tokens, as apply_chat_template does
            # itself: the template writes any BOS, and a plain list of ids comes back whatever
            # the transformers version (5.x returns a BatchEncoding for tokenize=True).
            prompt = self.tok.apply_chat_template(
                [{"role": "user", "content": text.rstrip("\n")}], add_generation_prompt=True, tokenize=False
            )
            return self.ids(prompt)
        return self.bos + self.ids(text)

    def typed_ids(self, text: str, result: tuple[int, int] | None) -> tuple[list[int], list[int] | None]:
        """The ids of ``text`` and the :data:`TOKEN_TYPES` code of each (None without a fast
        tokenizer's character offsets); ``result``: the result's characters in ``text``."""
        if not text:
            return [], []
        if not getattr(self.tok, "is_fast", False):
            return self.ids(text), None
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        types = []
        for a, b in enc.offset_mapping:
            hit = result is not None and a < result[1] and b > result[0]
            types.append(token_type(text[a:b], hit))
        return list(enc.input_ids), types

    def encode(self, ex: Example) -> Encoded:
        question = self.question_ids(ex.question)
        steps, types = [], []
        for i, s in enumerate(ex.steps):
            sep = self.cfg.step_separator if i else ""
            span = result_span(s)
            ids, t = self.typed_ids(sep + s, None if span is None else (span[0] + len(sep), span[1] + len(sep)))
            steps.append(ids)
            types.append(t)
        step_types = [] if any(t is None for t in types) else types
        answer = self.ids(self.cfg.answer_template.format(answer=ex.answer)) + [self.tok.eos_token_id]
        targets = []
        for s in ex.steps:
            r = step_result(s)
            r_ids = self.ids(r) if r is not None else []
            targets.append(r_ids[0] if r_ids else IGNORE)
        if len(question) > self.cfg.max_question_tokens:
            raise SequenceError(
                f"example {ex.source_id}: question has {len(question)} tokens > data.max_question_tokens"
            )
        n_cot = sum(map(len, steps))
        if n_cot > self.cfg.max_cot_tokens:
            raise SequenceError(f"example {ex.source_id}: CoT has {n_cot} tokens > data.max_cot_tokens")
        return Encoded(
            question, steps, list(self.answer_prefix_ids), answer, targets, str(ex.answer), ex.source_id, ex, step_types
        )


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with its tensors moved to ``device`` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def label_index(labels: torch.Tensor) -> torch.Tensor:
    """Flat positions ``b * N + n`` of ``labels [B, N]`` that carry a label (not -100), so the
    LM head can run on those alone (:func:`kava.losses.labelled_ce`)."""
    return (labels.reshape(-1) != IGNORE).nonzero().squeeze(-1)


def _pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [value] * (n - len(r)) for r in rows], dtype=torch.long)


def _pad_left(rows: list[list[int]], value: int) -> torch.Tensor:
    n = max(1, max(len(r) for r in rows))
    return torch.tensor([[value] * (n - len(r)) + r for r in rows], dtype=torch.long)


def teacher_steps(enc: Encoded, drop_last_step: bool) -> list[list[int]]:
    """The CoT steps the teacher reads (the last one dropped when asked and there are 2+)."""
    return enc.steps[:-1] if drop_last_step and len(enc.steps) > 1 else enc.steps


def teacher_batch(
    encs: list[Encoded],
    pad_id: int,
    *,
    with_cot: bool = True,
    drop_last_step: bool = False,
    question_left: bool = False,
) -> dict:
    """Right-padded ``Q C A`` (or ``Q A`` with ``with_cot=False``) with exact spans.

    ``question_left``: the question left-padded to the batch's longest one, as in the student's
    prefix (:func:`student_batch`), then ``C A`` right-padded: every question ends at column
    ``question_len - 1`` (returned), so one pass over the question serves both modes. Spans and
    masks follow the padding; positions come from the attention mask, so each example's
    outputs are the same in both layouts.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (aligned: CE on C and A) and
    ``label_index`` (the flat positions that carry a label, see :func:`label_index`),
    ``cot_step`` (step index per position, -1 elsewhere), ``answer_pos`` / ``answer_valid``
    (positions of the answer segment, ``[B, A]``), ``distill_pos`` (last answer-prefix token) and
    ``token_type`` (the :data:`TOKEN_TYPES` code of each CoT token, -1 elsewhere and wherever the
    encoder did not know it).
    """
    # Kept whole (over 60 lines): the spans of one batch laid out in the order the sequence holds them.
    rows, labels, cot_step, answer_pos, distill, types, valid = [], [], [], [], [], [], []
    q_len = max((len(e.question) for e in encs), default=0) if question_left else 0
    for e in encs:
        steps = teacher_steps(e, drop_last_step) if with_cot else []
        lead = q_len - len(e.question) if question_left else 0  # left padding before the question
        seq = [pad_id] * lead + list(e.question)
        step_ids = [-1] * len(seq)
        type_ids = [-1] * len(seq)
        for s, ids in enumerate(steps):
            seq += ids
            step_ids += [s] * len(ids)
            known = s < len(e.step_types) and len(e.step_types[s]) == len(ids)
            type_ids += e.step_types[s] if known else [-1] * len(ids)
        a0 = len(seq)
        seq += e.answer_prefix + e.answer
        step_ids += [-1] * (len(seq) - a0)
        type_ids += [-1] * (len(seq) - a0)
        types.append(type_ids)
        learn_from = lead + len(e.question)  # first token that is predicted
        lab = [IGNORE] * len(seq)
        for i in range(learn_from - 1, len(seq) - 1):
            lab[i] = seq[i + 1]
        rows.append(seq)
        valid.append([0] * lead + [1] * (len(seq) - lead))
        labels.append(lab)
        cot_step.append(step_ids)
        answer_pos.append(list(range(a0, len(seq))))
        distill.append(a0 + len(e.answer_prefix) - 1)
    ids = _pad_right(rows, pad_id)
    mask = _pad_right(valid, 0).bool()
    apos = _pad_right(answer_pos, 0)
    avalid = _pad_right([[1] * len(p) for p in answer_pos], 0).bool()
    lab = _pad_right(labels, IGNORE)
    out = {"question_len": q_len} if question_left else {}
    return out | {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": lab,
        "label_index": label_index(lab),
        "cot_step": _pad_right(cot_step, -1),
        "token_type": _pad_right(types, -1),
        "answer_pos": apos,
        "answer_valid": avalid,
        "distill_pos": torch.tensor(distill, dtype=torch.long),
    }


def latent_count(num_latents: int, stage: int | None, latents_per_step: int) -> int:
    """Latents used at curriculum ``stage`` (None: no curriculum, all ``num_latents``)."""
    return num_latents if stage is None else min(num_latents, stage * latents_per_step)


def student_batch(
    encs: list[Encoded],
    pad_id: int,
    bot_id: int,
    eot_id: int,
    num_latents: int,
    *,
    stage: int | None = None,
    latents_per_step: int = 1,
    with_answer: bool = True,
) -> dict:
    """The student's pieces: a left-padded prefix ``Q <bot>``, ``m`` latent slots, and a
    right-padded suffix ``<eot> [steps not yet replaced] A``.

    Left-padding the prefix puts every example's latents at the same columns. Returns
    ``prefix_ids``/``prefix_mask`` ``[B, P]``, ``num_latents`` (m), ``suffix_ids``/
    ``suffix_mask``/``suffix_labels`` ``[B, S]`` (labels aligned with the suffix logits),
    ``suffix_label_index`` (the flat suffix positions that carry a label),
    ``distill_idx`` (suffix index of the last answer-prefix token) and ``latent_targets``
    ``[B, m]``: the token the hidden state that *produces* latent j must predict (the result
    of the step that latent j closes), -100 elsewhere. ``stage`` (curriculum) replaces only
    the first ``stage`` steps. ``with_answer=False`` stops the suffix after the answer prefix
    (for generation).
    """
    # Kept whole (over 60 lines): the spans of one batch laid out in the order the sequence holds them.
    m = latent_count(num_latents, stage, latents_per_step)
    n_replaced = None if stage is None else stage
    prefixes, suffixes, labels, distill, targets = [], [], [], [], []
    for e in encs:
        prefixes.append(list(e.question) + [bot_id])
        kept = [] if n_replaced is None else e.steps[n_replaced:]
        seq = [eot_id]
        for ids in kept:
            seq += ids
        learn_from = 1  # the first predicted token is the one after <eot>
        seq += e.answer_prefix
        distill.append(len(seq) - 1)
        if with_answer:
            seq += e.answer
        lab = [IGNORE] * len(seq)
        for i in range(learn_from - 1, len(seq) - 1):
            lab[i] = seq[i + 1]
        if not with_answer:
            lab = [IGNORE] * len(seq)
        suffixes.append(seq)
        labels.append(lab)
        tgt = [IGNORE] * m
        replaced = len(e.steps) if n_replaced is None else min(n_replaced, len(e.steps))
        for s in range(replaced):
            j = (s + 1) * latents_per_step - 1
            if j < m:
                tgt[j] = e.step_targets[s] if s < len(e.step_targets) else IGNORE
        targets.append(tgt)
    suffix_labels = _pad_right(labels, IGNORE)
    return {
        "prefix_ids": _pad_left(prefixes, pad_id),
        "prefix_mask": _pad_left([[1] * len(p) for p in prefixes], 0).bool(),
        "num_latents": m,
        "suffix_ids": _pad_right(suffixes, pad_id),
        "suffix_mask": _pad_right([[1] * len(s) for s in suffixes], 0).bool(),
        "suffix_labels": suffix_labels,
        "suffix_label_index": label_index(suffix_labels),
        "distill_idx": torch.tensor(distill, dtype=torch.long),
        "latent_targets": torch.tensor(targets, dtype=torch.long).view(len(encs), m),
    }


def prompt_batch(encs: list[Encoded], pad_id: int, *, with_prefix: bool) -> dict:
    """Left-padded prompts for generation: ``Q`` (CoT mode) or ``Q A_prefix`` (no-CoT mode)."""
    rows = [list(e.question) + (e.answer_prefix if with_prefix else []) for e in encs]
    return {"input_ids": _pad_left(rows, pad_id), "attention_mask": _pad_left([[1] * len(r) for r in rows], 0).bool()}

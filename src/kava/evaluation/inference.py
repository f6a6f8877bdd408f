"""Answering questions with a trained model: load a checkpoint, ask a list of questions in
latent, CoT or no-CoT mode, get back the text, the parsed answer and the forward passes.

    import kava
    reasoner = kava.load("runs/tiny/kava")            # a checkpoint, or a run (its latest checkpoint)
    for a in reasoner.answer(["3+4*2-1"], mode="latent"):
        print(a.answer, a.forward_passes, a.text)

Generation is :func:`kava.evaluation.decode.generate`: batched greedy decoding with the KV
cache, exactly what ``kava eval`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..answers import GRADERS, extract_number, format_number
from ..data.schema import Example
from ..data.sequences import TextEncoder
from ..model.backbone import KavaModel
from ..model.checkpoints import find_checkpoint, load_checkpoint
from .decode import generate, graded_text, hit_cap

# Public mode names -> the decoder's: "latent" is the student (latent tokens, then the answer).
MODE_NAMES = {"latent": "student", "student": "student", "cot": "cot", "nocot": "nocot"}


@dataclass(frozen=True)
class Answer:
    """One question's answer."""

    question: str
    text: str  # what is graded: the answer prefix + generation (latent, nocot) or the generation (cot)
    generation: str  # the generated tokens, decoded
    answer: str | None  # the number read from ``text`` by the grader, None when it gives none
    forward_passes: int  # decoder calls (latent passes, the prompt pass, one per token after the first)
    generated_tokens: int
    truncated: bool  # hit the token cap without emitting <eos>


class LatentReasoner:
    """A loaded model that answers questions in batches (see :func:`load`)."""

    def __init__(self, model: KavaModel, grader: str = "strict"):
        if grader not in GRADERS:
            raise ValueError(f"unknown grader {grader!r}; choose from {', '.join(GRADERS)}")
        self.model = model.eval()
        self.cfg = model.cfg
        self.grader = grader
        self.encoder = TextEncoder(model.tokenizer, self.cfg.data, self.cfg.model.use_chat_template)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def answer(
        self,
        questions: list[str],
        mode: str = "latent",
        batch_size: int | None = None,
        max_new_tokens: int | None = None,
    ) -> list[Answer]:
        """Answer ``questions`` (written as in training: each goes through the checkpoint's
        ``data.question_template``) in ``mode``: ``latent`` (``<bot>``, the latent passes,
        ``<eot>``, the answer), ``cot`` (a chain of thought, then the answer) or ``nocot``.
        ``batch_size``: default ``eval.batch_size``; ``max_new_tokens``: default the
        checkpoint's ``eval.max_new_tokens`` (``eval.max_cot_tokens`` in cot mode)."""
        if isinstance(questions, str):
            raise TypeError("answer() takes a list of questions, not one string")
        if mode not in MODE_NAMES:
            raise ValueError(f"unknown mode {mode!r}; choose from latent, cot, nocot")
        decode_mode = MODE_NAMES[mode]
        bs = batch_size or self.cfg.eval.batch_size
        tok = self.model.tokenizer
        out: list[Answer] = []
        for i in range(0, len(questions), bs):
            chunk = list(questions[i : i + bs])
            encs = [self.encoder.encode(Example(question=q, steps=(), answer="")) for q in chunk]
            gen = generate(self.model, encs, decode_mode, self.cfg, max_new_tokens)
            for q, toks, passes in zip(chunk, gen.tokens, gen.passes):
                generation = tok.decode(toks, skip_special_tokens=True)
                text = graded_text(generation, decode_mode, self.cfg)
                value = extract_number(text, self.grader, marker=self.cfg.data.answer_prefix)
                out.append(
                    Answer(
                        q,
                        text,
                        generation,
                        None if value is None else format_number(value),
                        passes,
                        len(toks),
                        hit_cap(toks, tok.eos_token_id),
                    )
                )
        return out


def load(
    checkpoint: str | Path,
    device: str | torch.device | None = None,
    grader: str = "strict",
    trust_remote_code: bool = False,
) -> LatentReasoner:
    """A :class:`LatentReasoner` from a checkpoint folder (or a run folder: its latest
    checkpoint), on ``device`` (default: a GPU when there is one, else the CPU); ``grader``
    reads the answers (:data:`kava.answers.GRADERS`); ``trust_remote_code``: your permission
    to run code shipped with the base model (a checkpoint's own setting is ignored)."""
    model = load_checkpoint(find_checkpoint(checkpoint), trust_remote_code=trust_remote_code)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LatentReasoner(model.to(device), grader)

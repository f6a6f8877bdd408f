"""The training objective: one teacher pass, T+1 student passes, and every loss term.

    L = w_s * CE_student + w_t * CE_teacher + alpha1 * L_CODI + alpha2 * L_KV (+ w_z * CE_latent)

``train.mode`` picks what is trained: ``kava`` (all of the above; ``alpha_kv=0`` or
``loss.compression=none`` gives CODI-only), ``cot`` (CE on ``Q C A``), ``nocot`` (CE on ``Q A``)
or ``teacher`` (CE on the teacher's own sequence ``Q C' A``, C' the CoT without its last step
under ``loss.drop_last_step``: a base that already does the dropped step implicitly).

A KaVa step is :meth:`Objective.teacher_pass` (once, and only when something needs it),
:meth:`Objective.student_pass`, then the targets from the run's one target source
(:mod:`kava.distill.targets`) and the loss terms against them, weighed by
:meth:`Objective.weighted_loss`. The benchmark times these same methods.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from .. import losses
from ..config import KavaConfig
from ..data.sequences import Encoded, latent_count, student_batch, teacher_batch, to_device
from ..model.backbone import KavaModel
from ..model.latent import LatentState, PrefixCache, cache_span, encode_prefix, final_pass, positions, run_latents
from ..model.teacher import TeacherOutput, rope_at, teacher_forward, undo_rope
from .compression import Compressed, compress_cache
from .targets import Request, Student, TargetSource, TeacherSet, Terms, build_source, check_targets, kv_selector

log = logging.getLogger("kava.train")


def shares_question(tb: dict, sb: dict) -> bool:
    """Whether a question-left teacher batch (``question_len`` columns of question) and a student
    batch begin with the same tokens and padding, the student's prefix being that question and
    one ``<bot>``: the condition for encoding the question once (``train.shared_prefix``)."""
    q = tb["question_len"]
    p = sb["prefix_ids"]
    return (
        p.shape[1] == q + 1
        and tb["input_ids"].shape[1] >= q
        and torch.equal(tb["attention_mask"][:, :q], sb["prefix_mask"][:, :q])
        and torch.equal(
            torch.where(sb["prefix_mask"][:, :q], p[:, :q], -1),
            torch.where(tb["attention_mask"][:, :q], tb["input_ids"][:, :q], -1),
        )
    )


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached 0-dim tensors
    # The KV pair the loss compared, ``(teacher Compressed, student keys, student values)``,
    # each ``[L, B, H, M, d]``; None when no KV loss is computed.
    kv: tuple | None = None


def detached(**values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics as detached float tensors, left on the device (no host sync here)."""
    return {k: v.detach().float() for k, v in values.items()}


def metric_floats(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Read a dict of 0-dim metric tensors (or floats) with one device-to-host transfer."""
    if not metrics:
        return {}
    device = next((v.device for v in metrics.values() if torch.is_tensor(v)), torch.device("cpu"))
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(()) for v in metrics.values()])
    return dict(zip(metrics, values.tolist()))


@dataclass
class StudentPass:
    """The student's passes over one batch."""

    state: LatentState  # the latents, their cache and the states that produced them
    out: Any  # the final pass's decoder output (``hidden_states`` of every layer)
    mask: torch.Tensor  # [B, cached] attention mask over everything now cached
    k: int  # latents fed in the final pass: the suffix outputs start at column k
    ce: torch.Tensor  # the student's CE on its suffix (the answer, and any CoT steps left)
    answer_acc: torch.Tensor  # share of examples whose greedy first answer token is right


class Objective(nn.Module):
    """Builds batches from encoded examples and computes the loss for ``cfg.train.mode``.

    An ``nn.Module`` holding the model (and the target source, whose aligners and router
    train with it), so that ``accelerate``/DDP wrap the whole step:
    ``loss, metrics = objective(batch)``.
    """

    def __init__(self, model: KavaModel, cfg: KavaConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.pad_id = (
            model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
        )
        check_targets(cfg)
        self.selector = kv_selector(cfg)
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        # Where the targets come from: the own teacher pass, an offline cache (``loss.teacher_cache``)
        # or other teachers (``teachers.models``).
        self.source: TargetSource = build_source(model, cfg)
        self._said: set[str] = set()  # warnings already logged (once per run)

    @property
    def teachers(self) -> TeacherSet | None:
        """The other teachers (``teachers.models``), when they are the target source."""
        return self.source if isinstance(self.source, TeacherSet) else None

    # --- curriculum -----------------------------------------------------------------
    def max_stage(self) -> int:
        """The last curriculum stage: ``curriculum.max_stage``, or enough stages to replace
        ``num_latents`` latents ``latents_per_step`` at a time."""
        c = self.cfg.curriculum
        return c.max_stage or max(1, -(-self.cfg.latent.num_latents // c.latents_per_step))

    def stage_at(self, step: int) -> int | None:
        """Curriculum stage at optimizer ``step`` (None when the curriculum is off)."""
        c = self.cfg.curriculum
        if not c.enabled or self.cfg.train.mode != "kava":
            return None
        return min(self.max_stage(), 1 + step // c.steps_per_stage)

    def sequence_stage(self, stage: int | None) -> int | None:
        """The stage the student's sequence is built for: the last stage is the sequence
        evaluation decodes (all ``num_latents`` latents, no text step left, the teacher's whole
        CoT compressed), whatever ``max_stage``, ``latents_per_step`` or an example's number
        of steps; earlier stages replace their first ``stage`` steps."""
        return None if stage is None or stage >= self.max_stage() else stage

    def teacher_needs_graph(self) -> bool:
        """Whether the student's own teacher pass needs an autograd graph: only for its CE
        (``loss.teacher_ce > 0``); KV targets and CODI states are detached. Without it the
        pass runs under ``no_grad``: same gradients, no backward through ``0 * CE``."""
        return self.cfg.loss.teacher_ce > 0

    def runs_teacher(self) -> bool:
        """Whether a KaVa step runs the student's own teacher pass: for targets that come from
        it, or for its CE (``loss.teacher_ce > 0``). With an offline cache and
        ``teacher_ce = 0`` it does not run at all."""
        return self.source.needs_teacher_pass or self.cfg.loss.teacher_ce > 0

    # --- batches ---------------------------------------------------------------------
    def make_batch(self, encs: list[Encoded], step: int = 0) -> dict:
        mode = self.cfg.train.mode
        if mode == "cot":
            return {"teacher": teacher_batch(encs, self.pad_id, with_cot=True, drop_last_step=False)}
        if mode == "nocot":
            return {"teacher": teacher_batch(encs, self.pad_id, with_cot=False)}
        if mode == "teacher":  # the KaVa teacher's own sequence: under drop_last_step, the CoT without its last step
            return {
                "teacher": teacher_batch(encs, self.pad_id, with_cot=True, drop_last_step=self.cfg.loss.drop_last_step)
            }
        if (
            self.selector is not None
            and self.selector.needs_token_types
            and any(e.steps and not e.step_types for e in encs)
        ):
            raise ValueError(
                f"loss.compression={self.cfg.loss.compression} needs the token type of every CoT token, "
                "which needs a fast tokenizer (character offsets)"
            )
        stage = self.stage_at(step)
        seq_stage = self.sequence_stage(stage)
        lat = self.cfg.latent
        sb = student_batch(
            encs,
            self.pad_id,
            self.model.bot_id,
            self.model.eot_id,
            lat.num_latents,
            stage=seq_stage,
            latents_per_step=self.cfg.curriculum.latents_per_step,
        )
        share = self.cfg.train.shared_prefix and self.runs_teacher()
        drop = self.cfg.loss.drop_last_step
        tb = teacher_batch(encs, self.pad_id, with_cot=True, drop_last_step=drop, question_left=share)
        if share and not shares_question(tb, sb):
            self._say_once(
                "train.shared_prefix: the teacher's and the student's sequences do not start with the same "
                "question tokens here; encoding the question in each mode instead"
            )
            tb = teacher_batch(encs, self.pad_id, with_cot=True, drop_last_step=self.cfg.loss.drop_last_step)
        batch = {
            "stage": stage,
            "sequence_stage": seq_stage,
            "source_ids": [e.source_id for e in encs],
            "teacher": tb,
            "student": sb,
        }
        inputs = self.source.inputs(encs)  # other teachers' batches, in their own tokenization
        if inputs is not None:
            batch["external"] = inputs
        return batch

    def _say_once(self, message: str) -> None:
        if message not in self._said:
            self._said.add(message)
            log.warning("%s", message)

    # --- loss ------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.compute(batch)
        return out.loss, out.metrics

    def compute(self, batch: dict) -> StepOutput:
        device = next(self.model.parameters()).device
        t_batch = to_device(batch["teacher"], device)
        if self.cfg.train.mode != "kava":
            ce = self.ce_loss(t_batch)
            return StepOutput(ce, detached(loss=ce, ce=ce))
        return self.kava_loss(
            t_batch,
            to_device(batch["student"], device),
            batch.get("stage"),
            batch.get("source_ids"),
            batch.get("external"),
            batch.get("sequence_stage", batch.get("stage")),
        )

    def kava_loss(
        self,
        tb: dict,
        sb: dict,
        stage: int | None,
        source_ids: list[str] | None = None,
        external: list[dict] | None = None,
        sequence_stage: int | None = None,
    ) -> StepOutput:
        """The KaVa loss of one batch. ``stage``: the curriculum stage (logged);
        ``sequence_stage``: the stage the sequences were built for (:meth:`sequence_stage`);
        ``external``: what the target source built with the batch (``batch["external"]``).
        Metrics are detached 0-dim tensors: read them once per logging step, not per step."""
        lc = self.cfg.loss
        src = self.source
        # train.shared_prefix: the question, encoded once, is where both modes start.
        question = None
        if "question_len" in tb and self.runs_teacher():
            q = tb["question_len"]
            question = encode_prefix(self.model, sb["prefix_ids"][:, :q], sb["prefix_mask"][:, :q])
        teacher = None
        if self.runs_teacher():
            own_targets = src.needs_teacher_pass and src.kv_from_teacher_pass
            teacher = self.teacher_pass(
                tb, for_targets=own_targets, for_scale=src.needs_teacher_pass and lc.layer_std, question=question
            )
        student = self.student_pass(sb, question=question)
        lat_ce = self.latent_ce(student, sb) if lc.latent_ce > 0 else None
        states = self.student_states(sb, student)
        request = self.request(tb, teacher, external, sequence_stage, sb["num_latents"], source_ids)
        terms = self.source.compare(self.source.targets(request), states, lc)
        total = self.weighted_loss(student.ce, None if teacher is None else teacher.ce, lat_ce, terms)

        metrics: dict[str, torch.Tensor] = {} if lat_ce is None else {"latent_ce": lat_ce}
        metrics.update(terms.metrics)
        metrics.update(loss=total, ce_student=student.ce, codi=terms.codi, acc_student=student.answer_acc)
        if teacher is not None:
            metrics.update(ce_teacher=teacher.ce, acc_teacher=teacher.answer_acc)
        metrics = detached(**metrics)
        if stage is not None:
            metrics["stage"] = torch.tensor(float(stage))
        return StepOutput(total, metrics, terms.pair)

    # --- the step's parts --------------------------------------------------------------
    def ce_loss(self, tb: dict) -> torch.Tensor:
        """The CE of one plain pass over ``tb`` (``cot``, ``nocot`` and ``teacher`` modes)."""
        return teacher_forward(self.model, tb, want_queries=False, want_cache=False).ce

    def teacher_pass(
        self, tb: dict, for_targets: bool = True, for_scale: bool = False, question: PrefixCache | None = None
    ) -> TeacherOutput:
        """The student's own teacher pass over ``Q C A``: its CE and CODI hidden states and,
        when the run has a KV loss, its KV cache when its targets are used (``for_targets``, then
        also the answer queries the selector needs) or only its KV loss normaliser (``for_scale``,
        :meth:`kv_scale`). Without an autograd graph unless :meth:`teacher_needs_graph`.
        ``question``: ``Q`` already encoded (``train.shared_prefix``)."""
        kv = self.selector is not None
        queries = kv and for_targets and self.selector.needs_queries
        with nullcontext() if self.teacher_needs_graph() else torch.no_grad():
            return teacher_forward(
                self.model, tb, want_queries=queries, want_cache=kv and (for_targets or for_scale), question=question
            )

    def student_pass(self, sb: dict, question: PrefixCache | None = None) -> StudentPass:
        """The student's latent passes (T Jacobi or M sequential) and its final pass over
        ``<eot> ...``, with its CE on the suffix. ``question``: the prefix's question already
        encoded (``train.shared_prefix``)."""
        model, lat = self.model, self.cfg.latent
        state = run_latents(
            model,
            sb["prefix_ids"],
            sb["prefix_mask"],
            sb["num_latents"],
            lat.scheme,
            lat.iterations,
            suffix_ids=sb["suffix_ids"],
            question=question,
        )
        out, mask, k = final_pass(model, state, sb["suffix_ids"], sb["suffix_mask"], output_hidden_states=True)
        suffix = out.last_hidden_state[:, k:]
        ce = losses.labelled_ce(model.lm_head, suffix, sb["suffix_labels"], sb.get("suffix_label_index"))
        rows = torch.arange(suffix.shape[0], device=suffix.device)
        at = sb["distill_idx"].to(suffix.device)
        acc = losses.answer_accuracy(model.lm_head, suffix[rows, at], sb["suffix_labels"][rows, at])
        return StudentPass(state, out, mask, k, ce, acc)

    def latent_ce(self, student: StudentPass, sb: dict) -> torch.Tensor:
        """The per-latent loss: the state that produced latent j predicts step j's result."""
        return losses.token_ce(self.model.lm_head(student.state.producers), sb["latent_targets"])

    def student_states(self, sb: dict, student: StudentPass) -> Student:
        """What distillation compares on the student's side: its hidden states at the CODI
        position and, with a KV loss, its latents' keys (RoPE undone for ``loss.rope=pre``)
        and values."""
        rows = torch.arange(sb["prefix_ids"].shape[0], device=student.out.last_hidden_state.device)
        hidden = torch.stack([h[rows, student.k + sb["distill_idx"]] for h in student.out.hidden_states[1:]])
        keys = values = None
        if self.selector is not None:
            p, m = student.state.prefix_len, sb["num_latents"]
            keys, values = cache_span(student.state.cache, p, p + m)
            if self.cfg.loss.rope == "pre":
                keys = self.unrotate(keys, positions(student.mask)[:, p : p + m])
        return Student(keys, values, hidden, student.state.producers)

    def request(
        self,
        tb: dict,
        teacher: TeacherOutput | None,
        inputs: Any,
        stage: int | None,
        m: int,
        source_ids: list[str] | None,
    ) -> Request:
        """What the target source is given for one batch (see :class:`kava.distill.targets.Request`);
        with ``loss.layer_std`` and a source that runs the own pass, that pass's :meth:`kv_scale`."""
        kv = self.selector is not None
        compress = partial(self.teacher_targets, stage=stage, m=m, source_ids=source_ids) if kv else None
        scale = None
        if kv and self.cfg.loss.layer_std and self.source.needs_teacher_pass:
            scale = self.kv_scale(teacher, tb, stage)
        queries = kv and self.selector.needs_queries
        return Request(tb, teacher, inputs, source_ids, tb["input_ids"].device, compress, queries, scale)

    def weighted_loss(
        self, ce_student: torch.Tensor, ce_teacher: torch.Tensor | None, latent_ce: torch.Tensor | None, terms: Terms
    ) -> torch.Tensor:
        """``w_s CE_s + w_t CE_t (+ w_z CE_latent) + alpha2 L_KV + alpha1 L_CODI``, summed in
        that order; a term that was not computed (None) is left out."""
        lc = self.cfg.loss
        total = lc.student_ce * ce_student + (lc.teacher_ce * ce_teacher if ce_teacher is not None else 0.0)
        if latent_ce is not None:
            total = total + lc.latent_ce * latent_ce
        if terms.kv is not None:
            total = total + lc.alpha_kv * terms.kv
        return total + lc.alpha_codi * terms.codi

    @torch.no_grad()
    def kv_cosine_grid(self, encs: list[Encoded]) -> list[list[float]] | None:
        """Teacher-student cosine per layer and latent slot for the first of ``encs``.

        ``encs`` are run as one batch (the shuffled control needs another example to take the
        targets from; give at least two). Keys and values are compared entry by entry,
        averaged over KV heads and over K and V, at the last curriculum stage; slots the
        teacher could not fill are None. ``[L][M]``, or None when this run has no KV loss.
        """
        if self.selector is None:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.compute(self.make_batch(encs, step=10**9))
        finally:
            self.model.train(was_training)
        target, s_keys, s_values = out.kv
        cos = 0.5 * (
            torch.nn.functional.cosine_similarity(target.keys.float(), s_keys.float(), dim=-1)
            + torch.nn.functional.cosine_similarity(target.values.float(), s_values.float(), dim=-1)
        )
        valid = target.valid.expand_as(cos)[:, 0]  # [L, H, M] for the first example
        cos = cos[:, 0].masked_fill(~valid, float("nan"))
        grid = cos.nanmean(1)  # [L, M], mean over KV heads
        return [[None if v != v else round(v, 4) for v in row] for row in grid.tolist()]

    def teacher_targets(
        self,
        teacher,
        tb: dict,
        stage: int | None,
        m: int,
        model: KavaModel | None = None,
        source_ids: list[str] | None = None,
        selector=None,
    ) -> Compressed:
        """The teacher's compressed CoT cache: ``m`` slots per layer and KV head.

        ``stage``: the sequence stage (only its first ``stage`` CoT steps are compressed; None:
        the whole CoT). ``model``: the model that produced ``teacher`` (default the student's
        own), whose RoPE is undone for ``loss.rope=pre``. ``source_ids``: the examples' ids,
        so the shuffled control never hands an example a copy of its own targets. ``selector``: another
        selector than the run's (the instruments compare the run against R-KV targets).
        """
        selector = selector or self.selector
        cot = compressed_positions(tb, stage)
        answer_valid = tb["answer_valid"]
        types = tb.get("token_type")
        with torch.no_grad():
            keys, values = teacher.keys, teacher.values
            if self.cfg.loss.rope == "post":
                return compress_cache(
                    selector, keys, values, teacher.queries, cot, answer_valid, m, self.generator, source_ids, types
                )
            # Score on the cached (post-RoPE) keys, but carry RoPE-free keys through the same
            # gather / pooling / shuffling by packing them beside the values.
            pos = positions(tb["attention_mask"])  # (the question may be left-padded: train.shared_prefix)
            packed = torch.cat([values, self.unrotate(keys, pos, model)], -1)
            c = compress_cache(
                selector, keys, packed, teacher.queries, cot, answer_valid, m, self.generator, source_ids, types
            )
            d = values.shape[-1]
            c = Compressed(c.values[..., d:], c.values[..., :d], c.valid, c.indices)
        return c

    @torch.no_grad()
    def kv_scale(
        self, teacher: TeacherOutput, tb: dict, stage: int | None, model: KavaModel | None = None
    ) -> torch.Tensor:
        """The KV loss normaliser of a batch under ``loss.layer_std``, ``[2, L]``: the per-layer std of
        the teacher pass's keys (as the loss compares them: RoPE undone for ``loss.rope=pre``) and
        values over every CoT position the selector draws from (those of the sequence ``stage``),
        before any selection. It does not depend on the selector, so every arm on a batch (R-KV,
        right-crop, mean-pool, slot-mean, shuffled, gaussian, counterfactual, oracle) is scaled by
        the same numbers; ``teacher`` is the true teacher pass, never a counterfactual one."""
        return losses.scale_from_moments(self.kv_moments(teacher, tb, stage, model).sum(0))

    @torch.no_grad()
    def kv_moments(
        self, teacher: TeacherOutput, tb: dict, stage: int | None, model: KavaModel | None = None
    ) -> torch.Tensor:
        """Per example, the moments :meth:`kv_scale` is made of (:func:`kava.losses.kv_moments`,
        ``[B, 2, L, 3]``): an offline cache keeps them, so its batches get the online normaliser."""
        cot = compressed_positions(tb, stage)
        keys = teacher.keys
        if self.cfg.loss.rope == "pre":
            keys = self.unrotate(keys, positions(tb["attention_mask"]), model)  # (a question may be left-padded)
        return losses.kv_moments(keys, teacher.values, cot[None, :, None, :])

    def unrotate(self, keys: torch.Tensor, pos: torch.Tensor, model: KavaModel | None = None) -> torch.Tensor:
        """Undo ``model``'s (default: the student's) RoPE on ``keys [L, B, H, n, d]`` at positions ``pos [B, n]``."""
        cos, sin = rope_at(model or self.model, keys, pos)
        return undo_rope(keys, cos[None, :, None].to(keys.dtype), sin[None, :, None].to(keys.dtype))


def compressed_positions(tb: dict, stage: int | None) -> torch.Tensor:
    """``[B, N]`` bool: the CoT positions of a teacher batch that are compressed at the sequence
    ``stage`` (its first ``stage`` steps; None: the whole CoT)."""
    cot = tb["cot_step"] >= 0
    return cot if stage is None else cot & (tb["cot_step"] < stage)


__all__ = ["Objective", "compressed_positions", "StepOutput", "detached", "latent_count", "metric_floats"]

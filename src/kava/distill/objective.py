"""The training objective: one teacher pass, T+1 student passes, and every loss term.

    L = w_s * CE_student + w_t * CE_teacher + alpha1 * L_CODI + alpha2 * L_KV (+ w_z * CE_latent)

``train.mode`` picks what is trained: ``kava`` (all of the above; ``alpha_kv=0`` or
``loss.compression=none`` gives CODI-only), ``cot`` (CE on ``Q C A``) or ``nocot`` (CE on ``Q A``).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import losses
from ..config import KavaConfig
from ..data.sequences import Encoded, latent_count, student_batch, teacher_batch, to_device
from ..model.backbone import KavaModel
from ..model.latent import cache_span, final_pass, positions, run_latents
from ..model.teacher import rope_at, teacher_forward, undo_rope
from .compression import Compressed, compress_cache, get_selector


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


class Objective(nn.Module):
    """Builds batches from encoded examples and computes the loss for ``cfg.train.mode``.

    An ``nn.Module`` holding the model, so that ``accelerate``/DDP wrap the whole step:
    ``loss, metrics = objective(batch)``.
    """

    def __init__(self, model: KavaModel, cfg: KavaConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
        use_kv = cfg.loss.compression != "none" and cfg.loss.alpha_kv > 0
        self.selector = get_selector(cfg.loss.compression, cfg.loss.lam) if use_kv else None
        self.generator = torch.Generator().manual_seed(cfg.train.seed)
        # Offline teacher targets (``loss.teacher_cache``), looked up by the examples' source_ids.
        self.cache = None
        if cfg.loss.teacher_cache and cfg.train.mode == "kava":
            from .targets.cache import TeacherCache

            self.cache = TeacherCache(cfg.loss.teacher_cache, cfg, model)
        # Other teachers (``teachers.models``): frozen models, with trainable aligners and fusion.
        self.teachers = None
        if cfg.teachers.models and cfg.train.mode == "kava":
            from .targets.teachers import TeacherSet

            self.teachers = TeacherSet(model, cfg)

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

    # --- batches ---------------------------------------------------------------------
    def make_batch(self, encs: list[Encoded], step: int = 0) -> dict:
        mode = self.cfg.train.mode
        if mode == "cot":
            return {"teacher": teacher_batch(encs, self.pad_id, with_cot=True, drop_last_step=False)}
        if mode == "nocot":
            return {"teacher": teacher_batch(encs, self.pad_id, with_cot=False)}
        stage = self.stage_at(step)
        seq_stage = self.sequence_stage(stage)
        lat = self.cfg.latent
        batch = {
            "stage": stage,
            "sequence_stage": seq_stage,
            "source_ids": [e.source_id for e in encs],
            "teacher": teacher_batch(encs, self.pad_id, with_cot=True, drop_last_step=self.cfg.loss.drop_last_step),
            "student": student_batch(
                encs, self.pad_id, self.model.bot_id, self.model.eot_id, lat.num_latents,
                stage=seq_stage, latents_per_step=self.cfg.curriculum.latents_per_step,
            ),
        }
        if self.teachers is not None:
            batch["external"] = self.teachers.batches(encs)
        return batch

    # --- loss ------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.compute(batch)
        return out.loss, out.metrics

    def compute(self, batch: dict) -> StepOutput:
        device = next(self.model.parameters()).device
        t_batch = to_device(batch["teacher"], device)
        if self.cfg.train.mode != "kava":
            ce = teacher_forward(self.model, t_batch, want_queries=False, want_cache=False).ce
            return StepOutput(ce, detached(loss=ce, ce=ce))
        return self.kava_loss(t_batch, to_device(batch["student"], device), batch.get("stage"), batch.get("source_ids"),
                              batch.get("external"), batch.get("sequence_stage", batch.get("stage")))

    def kava_loss(self, tb: dict, sb: dict, stage: int | None, source_ids: list[str] | None = None,
                  external: list[dict] | None = None, sequence_stage: int | None = None) -> StepOutput:
        """The KaVa loss of one batch. ``stage``: the curriculum stage (logged);
        ``sequence_stage``: the stage the sequences were built for (:meth:`sequence_stage`).
        Metrics are detached 0-dim tensors: read them once per logging step, not per step."""
        cfg, model = self.cfg, self.model
        want_kv = self.selector is not None
        cached = None
        if self.cache is not None:
            if source_ids is None:
                raise ValueError("loss.teacher_cache is set but the batch carries no source_ids (build it with Objective.make_batch)")
            cached = self.cache.lookup(source_ids, tb["input_ids"].device)
        if self.teachers is not None and external is None:
            raise ValueError("teachers.models is set but the batch carries no teacher batches (build it with Objective.make_batch)")
        # The student's own teacher pass gives targets unless they come from a cache or only from
        # other teachers; it also runs for its own CE (teacher_ce > 0).
        own_targets = cached is None and (self.teachers is None or self.teachers.include_self)
        run_teacher = own_targets or cfg.loss.teacher_ce > 0
        if run_teacher:
            online_kv = want_kv and own_targets
            with nullcontext() if self.teacher_needs_graph() else torch.no_grad():
                teacher = teacher_forward(model, tb, want_queries=online_kv and self.selector.needs_queries, want_cache=online_kv)
            ce_t = teacher.ce
        t_hidden = cached[1] if cached is not None else teacher.hidden if own_targets else None

        m = sb["num_latents"]
        state = run_latents(model, sb["prefix_ids"], sb["prefix_mask"], m, cfg.latent.scheme, cfg.latent.iterations)
        out, mask, k = final_pass(model, state, sb["suffix_ids"], sb["suffix_mask"], output_hidden_states=True)
        suffix_h = out.last_hidden_state[:, k:]
        ce_s = losses.labelled_ce(model.lm_head, suffix_h, sb["suffix_labels"], sb.get("suffix_label_index"))

        b = sb["prefix_ids"].shape[0]
        rows = torch.arange(b, device=suffix_h.device)
        s_hidden = torch.stack([h[rows, k + sb["distill_idx"]] for h in out.hidden_states[1:]])

        metrics: dict[str, torch.Tensor] = {}
        kv_pair = None
        teacher_term = cfg.loss.teacher_ce * ce_t if run_teacher else 0.0
        total = cfg.loss.student_ce * ce_s + teacher_term
        if cfg.loss.latent_ce > 0:
            lat_ce = losses.token_ce(model.lm_head(state.producers), sb["latent_targets"])
            total = total + cfg.loss.latent_ce * lat_ce
            metrics["latent_ce"] = lat_ce
        if want_kv:
            p = state.prefix_len
            s_keys, s_values = cache_span(state.cache, p, p + m)
            if cfg.loss.rope == "pre":
                s_keys = self.unrotate(s_keys, positions(mask)[:, p : p + m])
        if self.teachers is not None:
            targets = self.teachers.teacher_targets(external, self, sequence_stage, m, source_ids)
            if self.teachers.include_self:
                targets.append((self.teacher_targets(teacher, tb, sequence_stage, m, source_ids=source_ids), teacher.hidden))
            kv, codi, fused, kv_pair = self.teachers(targets, s_keys, s_values, s_hidden, state.producers)
            total = total + cfg.loss.alpha_kv * kv
            metrics.update(fused, kv=kv)
        else:
            codi = losses.codi_loss(t_hidden, s_hidden, cfg.loss.codi_loss)
            if want_kv:
                target = cached[0] if cached is not None else self.teacher_targets(teacher, tb, sequence_stage, m, source_ids=source_ids)
                kv = losses.kv_loss(target.keys, target.values, s_keys, s_values, target.valid, cfg.loss.kv_loss, cfg.loss.layer_std)
                total = total + cfg.loss.alpha_kv * kv
                metrics["kv"] = kv
                kv_pair = (target, s_keys, s_values)
                metrics["kv_cos"] = 0.5 * (
                    losses.kv_cosine(target.keys, s_keys, target.valid) + losses.kv_cosine(target.values, s_values, target.valid)
                )
        total = total + cfg.loss.alpha_codi * codi
        metrics.update(loss=total, ce_student=ce_s, codi=codi)
        if run_teacher:
            metrics["ce_teacher"] = ce_t
        metrics = detached(**metrics)
        if stage is not None:
            metrics["stage"] = torch.tensor(float(stage))
        return StepOutput(total, metrics, kv_pair)

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
        cos = 0.5 * (torch.nn.functional.cosine_similarity(target.keys.float(), s_keys.float(), dim=-1)
                     + torch.nn.functional.cosine_similarity(target.values.float(), s_values.float(), dim=-1))
        valid = target.valid.expand_as(cos)[:, 0]  # [L, H, M] for the first example
        cos = cos[:, 0].masked_fill(~valid, float("nan"))
        grid = cos.nanmean(1)  # [L, M], mean over KV heads
        return [[None if v != v else round(v, 4) for v in row] for row in grid.tolist()]

    def teacher_targets(self, teacher, tb: dict, stage: int | None, m: int, model: KavaModel | None = None,
                        source_ids: list[str] | None = None) -> Compressed:
        """The teacher's compressed CoT cache: ``m`` slots per layer and KV head.

        ``stage``: the sequence stage (only its first ``stage`` CoT steps are compressed; None:
        the whole CoT). ``model``: the model that produced ``teacher`` (default the student's
        own), whose RoPE is undone for ``loss.rope=pre``. ``source_ids``: the examples' ids,
        so the shuffled control never hands an example a copy of its own targets.
        """
        cot = tb["cot_step"] >= 0
        if stage is not None:
            cot = cot & (tb["cot_step"] < stage)
        answer_valid = tb["answer_valid"]
        with torch.no_grad():
            keys, values = teacher.keys, teacher.values
            if self.cfg.loss.rope == "post":
                return compress_cache(self.selector, keys, values, teacher.queries, cot, answer_valid, m, self.generator, source_ids)
            # Score on the cached (post-RoPE) keys, but carry RoPE-free keys through the same
            # gather / pooling / shuffling by packing them beside the values.
            pos = torch.arange(keys.shape[3], device=cot.device)[None].expand(cot.shape[0], -1)
            packed = torch.cat([values, self.unrotate(keys, pos, model)], -1)
            c = compress_cache(self.selector, keys, packed, teacher.queries, cot, answer_valid, m, self.generator, source_ids)
            d = values.shape[-1]
            c = Compressed(c.values[..., d:], c.values[..., :d], c.valid, c.indices)
        return c

    def unrotate(self, keys: torch.Tensor, pos: torch.Tensor, model: KavaModel | None = None) -> torch.Tensor:
        """Undo ``model``'s (default: the student's) RoPE on ``keys [L, B, H, n, d]`` at positions ``pos [B, n]``."""
        cos, sin = rope_at(model or self.model, keys, pos)
        return undo_rope(keys, cos[None, :, None].to(keys.dtype), sin[None, :, None].to(keys.dtype))


__all__ = ["Objective", "StepOutput", "detached", "latent_count", "metric_floats"]

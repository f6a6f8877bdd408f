"""Teachers other than the student as the source of its targets: loading them, their batches,
their targets, and the fused loss against all of them (with the student's own pass as one
more teacher when ``teachers.include_self``).

Each teacher reads the example in its own tokenization (``Q C A``), runs once per step
without gradients, and its CoT cache is compressed to the same ``M`` slots as the student's
latents by the configured selector: the slots are the shared time axis, whatever the
tokenizers. A :class:`~kava.distill.align.TeacherAligner` per teacher maps its layers onto
the student's and the student's KV (and CODI hidden states) into the teacher's space; a
:class:`~kava.distill.fusion.Fusion` weighs the teachers slot by slot.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ... import losses
from ...config import ConfigError, KavaConfig, ModelConfig, TeacherModelConfig
from ...data.sequences import Encoded, TextEncoder, teacher_batch, to_device
from ...model.backbone import KavaModel
from ...model.checkpoints import CONFIG_FILE, build_model, latest_checkpoint, load_checkpoint
from ...model.files import ModelLoadError
from ...model.teacher import teacher_forward
from ..align import KVShape, TeacherAligner
from ..compression import Compressed
from ..fusion import Fusion, slot_distance, slot_valid
from .base import Request, Student, Target, TargetSource, Terms
from .cache import TeacherCache, model_shape
from .own import own_target

ALIGN_FILE = "teachers.safetensors"


def kv_shape(model: KavaModel) -> KVShape:
    """Layers, KV heads, head size and width of a model's decoder."""
    return _shape(model_shape(model))


def _shape(d: dict) -> KVShape:
    """A :class:`KVShape` from :func:`kava.distill.targets.cache.model_shape`'s dict (also a cache manifest's)."""
    return KVShape(d["num_layers"], d["num_kv_heads"], d["head_dim"], d["hidden_size"])


def rope_settings(model: KavaModel) -> dict:
    """What decides a key's rotation: RoPE parameters (base, scaling) and head size."""
    c = model.base_model.config.get_text_config()
    params = dict(getattr(c, "rope_parameters", None) or {})
    if not params:
        params = {"rope_theta": getattr(c, "rope_theta", None), "rope_scaling": getattr(c, "rope_scaling", None)}
    return {**params, "head_dim": kv_shape(model).head_dim}


def load_teacher(spec: TeacherModelConfig, cfg: KavaConfig, where: str = "teachers.models[]") -> KavaModel:
    """A frozen teacher in eval mode: a kava checkpoint or run folder (its latest checkpoint), or
    any backbone kava can load."""
    path = Path(spec.name_or_path)
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        path = latest_checkpoint(path) or path  # a run folder: its latest checkpoint
        if not (path / CONFIG_FILE).is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{where}.name_or_path: {path} is neither a kava checkpoint or run folder "
                f"(with {CONFIG_FILE} or checkpoint-N/) nor a model folder (with config.json)"
            )
    try:
        if (path / CONFIG_FILE).is_file():
            model = load_checkpoint(path, trust_remote_code=cfg.model.trust_remote_code)
        else:
            tcfg = copy.deepcopy(cfg)
            tcfg.model = ModelConfig(
                name_or_path=spec.name_or_path,
                gguf_file=spec.gguf_file,
                tiny=spec.tiny,
                adapter="full",
                dtype=cfg.model.dtype,
                attn_implementation=cfg.model.attn_implementation,
                trust_remote_code=cfg.model.trust_remote_code,
                use_chat_template=cfg.model.use_chat_template,
                cache_dir=cfg.model.cache_dir,
            )
            model = build_model(tcfg, with_adapter=False)
    except ModelLoadError as e:
        raise ModelLoadError(f"{where}.name_or_path: {str(e).removeprefix('model.name_or_path: ')}") from None
    model.requires_grad_(False)
    return model.eval()


def feature_size(aligner: TeacherAligner, student: KVShape) -> int:
    """Width of one aligned slot (all of a teacher layer's KV heads, flattened; concat: a window of layers)."""
    return student.kv_heads * student.head_dim if aligner.identity else aligner.features


def _slot_cosine(t: torch.Tensor, s: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cosine of ``[L, B, H, M, F]`` entries averaged over layers and heads -> ``[B, M]``."""
    cos = F.cosine_similarity(t.detach().float(), s.detach().float(), dim=-1)
    w = valid.float()
    return (cos * w).sum((0, 2)) / w.sum((0, 2)).clamp_min(1.0)


class TeacherSet(TargetSource, nn.Module):
    """The teachers of one run, their aligners and their fusion (the trainable parts, saved
    beside each checkpoint as :data:`ALIGN_FILE`).

    The teacher models themselves are kept outside the module tree: they are frozen, and
    neither the optimizer, DDP nor checkpoints should see them.
    """

    name = "teachers"
    state_file = ALIGN_FILE

    def __init__(self, model: KavaModel, cfg: KavaConfig):
        super().__init__()
        tc = cfg.teachers
        self.cfg = cfg
        self.include_self = tc.include_self
        self.needs_teacher_pass = tc.include_self
        # Per teacher: a frozen model to run, or the offline cache of one (the other is None).
        self.externals: list[KavaModel | None] = []
        self.caches: list[TeacherCache | None] = []
        for i, s in enumerate(tc.models):
            where = f"teachers.models[{i}]"
            cache = TeacherCache(s.cache, cfg, model, f"{where}.cache", other_model=True) if s.cache else None
            self.caches.append(cache)
            self.externals.append(None if cache else load_teacher(s, cfg, where))
        self.encoders = [
            t and TextEncoder(t.tokenizer, cfg.data, t.cfg.model.use_chat_template) for t in self.externals
        ]
        # Each teacher's encoding of an example, made once (tokenising a batch costs ~30 ms on a CPU).
        self._encoded: list[dict] = [{} for _ in self.externals]
        student = kv_shape(model)
        shapes = [kv_shape(t) if t else _shape(c.shape) for t, c in zip(self.externals, self.caches)]
        shapes += [student] if tc.include_self else []
        self.aligners = nn.ModuleList(TeacherAligner(student, sh, tc.aggregation) for sh in shapes)
        for i, (t, al) in enumerate(zip(self.externals, self.aligners)):
            # (A cache records its RoPE mode, which must be this run's loss.rope.)
            rope_differs = t is not None and rope_settings(t) != rope_settings(model)
            if cfg.loss.rope == "post" and (not al.identity or rope_differs):
                raise ConfigError(
                    f"config field 'loss.rope': teachers.models[{i}] differs from the student in shape or RoPE, "
                    "so keys must be compared before RoPE: set loss.rope=pre"
                )
        dims = [feature_size(al, student) for al in self.aligners]
        weights = [s.weight for s in tc.models] + ([tc.self_weight] if tc.include_self else [])
        self.fusion = Fusion(
            tc.fusion,
            len(shapes),
            weights,
            tc.router,
            student.hidden,
            dims,
            tc.router_hidden,
            tc.temperature,
            tc.entropy_weight,
        )

    # --- batches -------------------------------------------------------------------------
    def covers(self, source_ids: list[str]) -> bool:
        return all(c.covers(source_ids) for c in self.caches if c is not None)

    def inputs(self, encs: list[Encoded]) -> list[dict | None]:
        return self.batches(encs)

    def batches(self, encs: list[Encoded]) -> list[dict | None]:
        """Each teacher's ``Q C A`` batch from the examples in its own tokenization (None for a cache)."""
        if any(e.example is None for e in encs):
            raise ValueError("teachers.models needs the examples' text: encode them with TextEncoder.encode")
        out = []
        for t, enc, seen in zip(self.externals, self.encoders, self._encoded):
            if t is None:
                out.append(None)
                continue
            rows = [
                seen[e.example] if e.example in seen else seen.setdefault(e.example, enc.encode(e.example))
                for e in encs
            ]
            pad = t.tokenizer.pad_token_id if t.tokenizer.pad_token_id is not None else t.tokenizer.eos_token_id
            out.append(teacher_batch(rows, pad, with_cot=True, drop_last_step=self.cfg.loss.drop_last_step))
        return out

    # --- targets and loss ------------------------------------------------------------------
    def targets(self, request: Request) -> list[Target]:
        """Per teacher, its compressed ``[Lt, B, Ht, m, dt]`` cache and CODI hidden states
        ``[Lt, B, Dt]``: the external ones in order (each run once, without gradients, or read
        from its cache), then, with ``include_self``, the step's own teacher pass."""
        if request.inputs is None:
            raise ValueError(
                "teachers.models is set but the batch carries no teacher batches (build it with Objective.make_batch)"
            )
        out = []
        device = request.device
        for t, cache, tb in zip(self.externals, self.caches, request.inputs):
            if cache is not None:
                out.append(cache.lookup(request.source_ids, device))
                continue
            if t.lm_head.weight.device != device:
                t.to(device)
            tb = to_device(tb, device)
            with torch.no_grad():
                run = teacher_forward(t, tb, want_queries=request.needs_queries, want_cache=True, want_logits=False)
            out.append(Target(request.compress(run, tb, model=t), run.hidden))
        if self.include_self:
            out.append(own_target(request))
        return out

    def compare(self, targets: list[Target], student: Student, loss) -> Terms:
        """The fused KV loss and the CODI loss against every teacher (:meth:`forward`)."""
        kv, codi, metrics, pair = self(targets, student.keys, student.values, student.hidden, student.producers)
        return Terms(kv, codi, {**metrics, "kv": kv}, pair)

    def trained_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(
        self,
        targets: list[Target],
        s_keys: torch.Tensor,
        s_values: torch.Tensor,
        s_hidden: torch.Tensor,
        producers: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, dict, tuple]:
        """Fused KV loss and CODI loss against every teacher.

        ``targets``: per teacher (external ones first, then the student's own pass), its
        compressed cache and CODI hidden states; ``s_keys``/``s_values`` ``[Ls, B, Hs, m, ds]``
        the student's latent KV (pre-RoPE when ``loss.rope=pre``), ``s_hidden [Ls, B, Ds]`` at
        the CODI position, ``producers [B, m, D]`` the states that produced each latent (router
        input). Returns ``(kv, codi, metrics, (first teacher's aligned target, student k, v))``.

        Under ``loss.layer_std`` each teacher's distance is scaled by the per-layer std of its own
        aligned targets (:func:`kava.losses.kv_scale`), not by :attr:`Target.scale`: an aligner's layer
        mix or window is learned, so no statistic of the raw cache matches the space compared in.
        """
        lc = self.cfg.loss
        dist, sims, valid, summaries, codis, pairs = [], [], [], [], [], []
        for al, target in zip(self.aligners, targets):
            comp, hidden = target.kv, target.hidden
            tk, tv, tval = al.teacher_kv(comp.keys, comp.values, comp.valid)
            sk, sv = al.student_kv(s_keys, s_values)
            # Each teacher in its own (aligned, possibly learned) space, scaled by its aligned targets' std.
            scale = losses.kv_scale(tk, tv, tval) if lc.layer_std else None
            dist.append(slot_distance(tk, tv, sk, sv, tval, lc.kv_loss, scale))
            sims.append(0.5 * (_slot_cosine(tk, sk, tval) + _slot_cosine(tv, sv, tval)))
            valid.append(slot_valid(tval))
            summaries.append(tk.detach().float().mean(0).permute(0, 2, 1, 3).flatten(2))  # [B, m, H * F]
            codis.append(losses.codi_loss(al.teacher_hidden(hidden), al.student_hidden(s_hidden), lc.codi_loss))
            pairs.append((Compressed(tk, tv, tval), sk, sv))
        kv, weights, metrics = self.fusion(
            torch.stack(dist), torch.stack(sims), torch.stack(valid), producers, summaries
        )
        # Each teacher's share of the CODI loss is its mean routing weight over the filled slots.
        filled = torch.stack(valid).float()
        share = (weights.detach() * filled).sum((1, 2)) / filled.sum((1, 2)).clamp_min(1.0)
        share = share / share.sum().clamp_min(1e-8)
        codi = (share * torch.stack(codis)).sum()
        sim_mean = (torch.stack(sims) * filled).sum((1, 2)) / filled.sum((1, 2)).clamp_min(1.0)
        metrics = {**metrics, "kv_cos": (share * sim_mean).sum().detach()}
        metrics.update({f"kv_cos{k}": c for k, c in enumerate(sim_mean.detach().unbind())})
        return kv, codi, metrics, pairs[0]


__all__ = ["ALIGN_FILE", "TeacherSet", "feature_size", "kv_shape", "load_teacher", "rope_settings"]

"""The counterfactual control as a source of targets: the student's own teacher, reading a CoT
with wrong intermediate results.

Each batch also gets the teacher sequences ``Q C' A`` of :func:`kava.data.counterfactual.counterfactual_example`
(same question, same format, other step results; seeded by ``train.seed`` and the example's id).
The KV targets are the run's selection (R-KV for ``loss.compression=counterfactual``) on a
no-grad teacher pass over them; the CODI targets, the teacher's CE, the KV loss normaliser under
``loss.layer_std`` (:attr:`~.base.Target.scale`) and everything else come from the step's own pass
over the true CoT, as for :mod:`.own`: the control differs from R-KV only in the targets' content.
"""

from __future__ import annotations

import torch

from ...data.counterfactual import counterfactual_example
from ...data.sequences import Encoded, TextEncoder, teacher_batch, to_device
from ...model.teacher import teacher_forward
from .base import Request, Target, TargetSource


class CounterfactualPass(TargetSource):
    """KV targets from a teacher pass over a counterfactual CoT; CODI targets from the true one."""

    name = "counterfactual"
    needs_teacher_pass = True  # for the CODI states and the teacher's CE
    kv_from_teacher_pass = False  # the KV targets come from the counterfactual pass

    def __init__(self, model, cfg):
        self.model = model
        self.cfg = cfg
        self.encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def inputs(self, encs: list[Encoded]) -> dict:
        """The counterfactual teacher batch of ``encs`` (on the CPU)."""
        missing = [e.source_id for e in encs if e.example is None]
        if missing:
            raise ValueError(
                f"example {missing[0]}: the counterfactual control needs the example's text (Encoded.example)"
            )
        cf = [self.encoder.encode(counterfactual_example(e.example, self.cfg.train.seed)) for e in encs]
        return teacher_batch(cf, self.pad_id, with_cot=True, drop_last_step=self.cfg.loss.drop_last_step)

    def targets(self, request: Request) -> list[Target]:
        own = request.teacher
        kv = None
        if request.compress is not None:
            batch = to_device(request.inputs, request.device)
            with torch.no_grad():
                run = teacher_forward(self.model, batch, want_queries=request.needs_queries, want_cache=True)
            kv = request.compress(run, batch)
        return [Target(kv, own.hidden, request.kv_scale)]

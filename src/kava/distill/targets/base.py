"""What every source of distillation targets is: one small interface, one file per source.

A student is distilled towards, per teacher, a compressed CoT KV cache (``M`` slots per layer
and KV head) and the hidden states at the CODI position: a :class:`Target`. A
:class:`TargetSource` says where they come from (the student's own teacher pass, an offline
cache, other teachers) and how the student is compared with them. The objective runs the
step's passes, then asks its one source for the targets (:meth:`TargetSource.targets`) and
for the loss terms against them (:meth:`TargetSource.compare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from ... import losses
from ...config import LossConfig
from ...model.teacher import TeacherOutput
from ..compression import Compressed


class Target(NamedTuple):
    """One teacher's targets for a batch, in that teacher's own shape."""

    kv: Compressed | None  # the compressed CoT cache [L, B, H_kv, M, d] (None: this run has no KV loss)
    hidden: torch.Tensor  # hidden states at the CODI position [L, B, D] (detached)
    # The KV loss normaliser under ``loss.layer_std`` (:func:`kava.losses.kv_scale`, ``[2, L]``): the
    # per-layer std of K and V of the true teacher's whole CoT cache, the same for every selector.
    # None: no KV loss, no ``loss.layer_std``, or a source without that cache (an offline cache keeps
    # only the compressed entries), whose targets are then scaled by their own std.
    scale: torch.Tensor | None = None


@dataclass
class Request:
    """What a source is given to produce the targets of one batch."""

    teacher_batch: dict  # the student's ``Q C A`` batch (kava.data.sequences.teacher_batch), on the device
    teacher: TeacherOutput | None  # the step's own teacher pass, None when it did not run
    inputs: Any  # what the source's :meth:`TargetSource.inputs` built with the batch (None if nothing)
    source_ids: list[str] | None  # the examples' ids, in batch order
    device: torch.device
    # ``compress(teacher pass, its batch, its model=None) -> Compressed``: the run's selector at
    # the sequence stage, ``M`` slots (None when the run has no KV loss); ``needs_queries``:
    # whether it needs the answer queries of the pass.
    compress: Callable[..., Compressed] | None
    needs_queries: bool
    # The KV loss normaliser of the step's own true teacher pass (see :attr:`Target.scale`); None
    # without ``loss.layer_std``, a KV loss, or that pass's cache.
    kv_scale: torch.Tensor | None = None


@dataclass
class Student:
    """The student's side of the comparison."""

    keys: torch.Tensor | None  # latent keys [L, B, H_kv, M, d] (RoPE undone with loss.rope=pre; None: no KV loss)
    values: torch.Tensor | None  # latent values [L, B, H_kv, M, d]
    hidden: torch.Tensor  # hidden states at the CODI position [L, B, D]
    producers: torch.Tensor  # the hidden state that produced each latent [B, M, D]


@dataclass
class Terms:
    """The distillation loss terms of one batch."""

    kv: torch.Tensor | None  # the KV loss (None: this run has none)
    codi: torch.Tensor  # the CODI hidden-state loss
    metrics: dict[str, torch.Tensor]  # logged beside them (kv, kv_cos, ...)
    pair: tuple | None  # (teacher Compressed, student keys, student values) the KV loss compared


class TargetSource:
    """Where a student's distillation targets come from.

    Subclasses set :attr:`name` (their key in :data:`kava.distill.targets.SOURCES`) and
    implement :meth:`targets`; :meth:`inputs` and :meth:`compare` have defaults. A source
    with trained parts (an ``nn.Module`` with parameters) names the file they are saved to
    beside each checkpoint in :attr:`state_file`.
    """

    name: str = ""
    #: The targets come from the step's own teacher pass, which must then keep its KV cache
    #: (and answer queries). The pass runs anyway when ``loss.teacher_ce > 0``, for its CE.
    needs_teacher_pass: bool = False
    #: With :attr:`needs_teacher_pass`, whether the KV targets are selected from that pass's
    #: cache. False for a source that takes only the CODI states from it and its KV targets
    #: from elsewhere (the counterfactual control): the pass then keeps no cache copy.
    kv_from_teacher_pass: bool = True
    state_file: str | None = None

    def inputs(self, encs: list) -> Any:
        """Extra inputs built with a batch from its encoded examples (None: nothing)."""
        return None

    def targets(self, request: Request) -> list[Target]:
        """The targets of one batch: one :class:`Target` per teacher."""
        raise NotImplementedError

    def covers(self, source_ids: list[str]) -> bool:
        """Whether this source has targets for these examples (an offline cache holds only the
        examples it was extracted from; a source that runs a teacher covers every example)."""
        return True

    def compare(self, targets: list[Target], student: Student, loss: LossConfig) -> Terms:
        """The loss terms of ``student`` against ``targets``; by default one teacher in the
        student's own shape, compared entry by entry (:func:`direct_terms`)."""
        return direct_terms(targets[0], student, loss)

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters trained with the student (none by default)."""
        return []


def direct_terms(target: Target, student: Student, loss: LossConfig) -> Terms:
    """CODI loss, and (when the run has one) KV loss and KV cosine, of a student against one
    teacher of its own shape. Under ``loss.layer_std`` the KV loss is scaled by ``target.scale``
    (the true teacher's statistic), or by the targets' own per-layer std when the source has none."""
    codi = losses.codi_loss(target.hidden, student.hidden, loss.codi_loss)
    if student.keys is None:
        return Terms(None, codi, {}, None)
    t = target.kv
    scale = None
    if loss.layer_std:
        scale = target.scale if target.scale is not None else losses.kv_scale(t.keys, t.values, t.valid)
    kv = losses.kv_loss(t.keys, t.values, student.keys, student.values, t.valid, loss.kv_loss, scale)
    kv_cos = 0.5 * (
        losses.kv_cosine(t.keys, student.keys, t.valid) + losses.kv_cosine(t.values, student.values, t.valid)
    )
    return Terms(kv, codi, {"kv": kv, "kv_cos": kv_cos}, (t, student.keys, student.values))

"""The student's own teacher pass as the source of its targets: self-distillation, as in the paper.

The step's teacher pass reads ``Q C A`` with the student's weights; its CoT cache is
compressed to ``M`` slots by the run's selector and its hidden states at the CODI position
are the CODI targets. Nothing runs here: the objective runs that pass once per step (it
also gives the teacher's CE) and hands it over in the request.
"""

from __future__ import annotations

from .base import Request, Target, TargetSource


class OwnPass(TargetSource):
    """Targets from the step's own teacher pass."""

    name = "self"
    needs_teacher_pass = True

    def __init__(self, model=None, cfg=None):
        pass

    def targets(self, request: Request) -> list[Target]:
        return [own_target(request)]


def own_target(request: Request) -> Target:
    """The target of the step's own teacher pass (its cache compressed when the run has a KV loss),
    scaled by that pass's own statistic (:attr:`Request.kv_scale`)."""
    t = request.teacher
    kv = request.compress(t, request.teacher_batch) if request.compress is not None else None
    return Target(kv, t.hidden, request.kv_scale)

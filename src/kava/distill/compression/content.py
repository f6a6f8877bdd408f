"""Selectors defined by what the chain of thought says, for the content controls.

* ``oracle`` (a positive control): keeps the tokens that hold each step's result (token type
  ``result`` of :data:`kava.data.sequences.TOKEN_TYPES`), then fills the rest of the budget in
  R-KV order;
* ``counterfactual``: R-KV selection on the cache of a teacher that read the same question with
  wrong intermediate results (:mod:`kava.data.counterfactual`); the selection is plain R-KV, the
  counterfactual pass is run by its target source (:mod:`kava.distill.targets.counterfactual`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data.sequences import RESULT
from .base import SelectRequest, register, top_budget
from .rkv import RKVSelector

RESULT_BONUS = 2.0
"""Added to the R-KV score (at most 1) of a result token, so every result is kept first."""


@register("oracle")
@dataclass
class OracleSelector(RKVSelector):
    """Keep every result token (in time order), the rest of the budget by R-KV score."""

    name: str = "oracle"
    needs_token_types = True

    def select(self, r: SelectRequest) -> tuple[torch.Tensor, torch.Tensor]:
        if r.token_types is None:
            raise ValueError("the oracle selector needs the token types of the teacher batch (token_type)")
        scores = self.score(r).float()
        scores = scores + RESULT_BONUS * (r.token_types == RESULT).to(scores.dtype)[:, None, :]
        return top_budget(scores, r.cot_mask, r.budget)


@register("counterfactual")
@dataclass
class CounterfactualSelector(RKVSelector):
    """R-KV; the run's targets come from a teacher pass over a counterfactual CoT."""

    name: str = "counterfactual"
    second_pass = True


__all__ = ["CounterfactualSelector", "OracleSelector", "RESULT_BONUS"]

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
from .base import Compressed, gather_slots, top_budget
from .rkv import RKVSelector

RESULT_BONUS = 2.0
"""Added to the R-KV score (at most 1) of a result token, so every result is kept first."""


@dataclass
class OracleSelector(RKVSelector):
    """Keep every result token (in time order), the rest of the budget by R-KV score."""

    name: str = "oracle"
    needs_token_types = True

    def select(self, keys, queries, cot_mask, answer_mask, budget, generator=None, token_types=None):
        if token_types is None:
            raise ValueError("the oracle selector needs the token types of the teacher batch (token_type)")
        scores = self.score(keys, queries, cot_mask, answer_mask, budget, generator).float()
        scores = scores + RESULT_BONUS * (token_types == RESULT).to(scores.dtype)[:, None, :]
        return top_budget(scores, cot_mask, budget)

    def compress(self, keys, values, queries, cot_mask, answer_mask, budget, generator=None, token_types=None):
        indices, valid = self.select(keys, queries, cot_mask, answer_mask, budget, generator, token_types)
        return Compressed(gather_slots(keys, indices), gather_slots(values, indices), valid, indices)


@dataclass
class CounterfactualSelector(RKVSelector):
    """R-KV; the run's targets come from a teacher pass over a counterfactual CoT."""

    name: str = "counterfactual"
    reads_counterfactual = True


__all__ = ["CounterfactualSelector", "OracleSelector", "RESULT_BONUS"]

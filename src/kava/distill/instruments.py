"""Instruments that say what a student's latents carry, measured on held-out examples.

* :func:`logit_lens`: each latent's producing hidden state decoded through the LM head, scored
  per latent slot against the step results (the slot's own step, and any step of the example);
* :func:`kv_alignment`: how far the student's latent KV is from its own example's teacher target
  (R-KV selection of the true teacher's cache) and from a neighbour's (the pairing of the shuffled
  control) and the batch slot mean: a KV loss that transfers the example's content predicts
  own < neighbour;
* :func:`selector_keeps`: what each index-based selector keeps of the teacher's cache: the share
  of slots per token type (:data:`kava.data.sequences.TOKEN_TYPES`) and how many of the result
  tokens it keeps.

All three run in eval mode without gradients on one batch, at the last curriculum stage; the
training loop writes them to the run folder: the first two at every evaluation point and at the end
(``instruments.jsonl``), what the selectors keep once, at step 0, on the teacher the run starts
from (``selector_keeps.json``).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..data.sequences import IGNORE, RESULT, TOKEN_TYPES, Encoded, to_device
from ..model.latent import cache_span, positions
from ..model.teacher import teacher_forward
from .compression import SELECTORS, RKVSelector, batch_moments, compress_cache, get_selector, partners
from .objective import Objective

INDEX_SELECTORS = tuple(n for n in SELECTORS if get_selector(n).index_based)
"""The selectors whose kept positions :func:`selector_keeps` reports (the others keep no positions
of the example's own cache, or read another teacher pass)."""


class _Eval:
    """The model in eval mode for the duration of a ``with`` block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def _passes(objective: Objective, encs: list[Encoded]) -> dict:
    """One teacher pass (cache and answer queries) and the student's passes over ``encs``."""
    model = objective.model
    device = next(model.parameters()).device
    batch = objective.make_batch(encs, step=10**9)
    tb = to_device(batch["teacher"], device)
    sb = to_device(batch["student"], device)
    teacher = teacher_forward(model, tb, want_queries=True, want_cache=True, want_ce=False)
    student = objective.student_pass(sb)
    p, m = student.state.prefix_len, sb["num_latents"]
    keys, values = cache_span(student.state.cache, p, p + m)
    if objective.cfg.loss.rope == "pre":
        keys = objective.unrotate(keys, positions(student.mask)[:, p : p + m])
    return {
        "tb": tb,
        "sb": sb,
        "teacher": teacher,
        "student": student,
        "keys": keys,
        "values": values,
        "m": m,
        "source_ids": batch["source_ids"],
    }


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None or x != x else round(float(x), n)


def logit_lens(objective: Objective, passes: dict) -> dict:
    """Per latent slot ``j``: ``aligned`` (share of examples with a step ``j`` whose decoded token
    is that step's result), ``any_result`` (share whose decoded token is one of the example's step
    results), ``n`` (examples with a step ``j``) and ``top`` (the three most common decoded tokens
    with their shares); ``aligned_mean`` over the slots that have a step."""
    model = objective.model
    producers = passes["student"].state.producers  # [B, M, D]
    decoded = model.lm_head(producers).argmax(-1).cpu()  # [B, M]
    targets = passes["sb"]["latent_targets"].cpu()  # [B, M]
    results = [set(t for t in row.tolist() if t != IGNORE) for row in targets]
    tok = model.tokenizer
    slots = []
    for j in range(decoded.shape[1]):
        has = targets[:, j] != IGNORE
        n = int(has.sum())
        aligned = float((decoded[has, j] == targets[has, j]).float().mean()) if n else None
        any_hit = sum(int(decoded[b, j]) in results[b] for b in range(decoded.shape[0])) / decoded.shape[0]
        top = Counter(decoded[:, j].tolist()).most_common(3)
        slots.append(
            {
                "slot": j,
                "n": n,
                "aligned": _round(aligned),
                "any_result": _round(any_hit),
                "top": [[tok.decode([t]), _round(c / decoded.shape[0])] for t, c in top],
            }
        )
    scored = [s["aligned"] for s in slots if s["aligned"] is not None]
    return {"slots": slots, "aligned_mean": _round(sum(scored) / len(scored)) if scored else None}


def _layer_distance(t: torch.Tensor, s: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean |t - s| / scale per layer and example over the valid slots: ``[L, B]`` from
    ``t, s [L, B, H, M, d]``, ``valid [L, B, H, M]``, ``scale [L]``."""
    w = valid[..., None].float()
    diff = ((t.float() - s.float()).abs() * w).sum((2, 3, 4))
    count = (w.sum((2, 3, 4)) * t.shape[-1]).clamp_min(1)
    return diff / count / scale[:, None]


def kv_alignment(objective: Objective, passes: dict) -> dict | None:
    """The student's latent KV against R-KV targets of the true teacher (the training L1, each
    layer divided by the teacher's std): to its own example's (``own``), to a neighbour's
    (``neighbour``, paired as the shuffled control pairs) and to the batch slot mean
    (``slot_mean``), averaged over layers, K and V. Returns the means, ``own_below_neighbour``
    (the share of examples whose own distance is the smaller), ``gap`` (mean neighbour - own) and
    the same against the slot mean; None with fewer than two examples or no CoT."""
    keys, values = passes["keys"], passes["values"]
    b = keys.shape[1]
    if b < 2:
        return None
    rkv = RKVSelector(lam=objective.cfg.loss.lam)
    target = objective.teacher_targets(passes["teacher"], passes["tb"], None, passes["m"], selector=rkv)
    if not bool(target.valid.any()):
        return None  # no CoT to compare with
    partner, ok = partners(passes["source_ids"], b, keys.device)
    out = {}
    dist = {"own": 0.0, "neighbour": 0.0, "slot_mean": 0.0}
    for t, s in ((target.keys, keys), (target.values, values)):
        valid = target.valid
        mean, _, _ = batch_moments(t.float(), valid)
        scale = torch.stack([t[layer][valid[layer]].float().std() for layer in range(t.shape[0])]).clamp_min(1e-6)
        nb_t, nb_valid = t.index_select(1, partner), valid.index_select(1, partner)
        dist["own"] = dist["own"] + 0.5 * _layer_distance(t, s, valid, scale).mean(0)
        dist["neighbour"] = dist["neighbour"] + 0.5 * _layer_distance(nb_t, s, nb_valid & valid, scale).mean(0)
        dist["slot_mean"] = dist["slot_mean"] + 0.5 * _layer_distance(mean.expand_as(t), s, valid, scale).mean(0)
    own, nb, sm = dist["own"].cpu(), dist["neighbour"].cpu(), dist["slot_mean"].cpu()
    ok = ok.cpu()
    out.update(
        n=int(ok.sum()),
        own=_round(own.mean()),
        neighbour=_round(nb[ok].mean()),
        slot_mean=_round(sm.mean()),
        own_below_neighbour=_round((own[ok] < nb[ok]).float().mean()),
        gap=_round((nb[ok] - own[ok]).mean()),
        own_below_slot_mean=_round((own < sm).float().mean()),
        gap_slot_mean=_round((sm - own).mean()),
    )
    return out


def selector_keeps(objective: Objective, passes: dict, names: tuple[str, ...] = INDEX_SELECTORS, seed: int = 0) -> dict:
    """Per selector: ``shares`` (share of its kept slots on each token type), ``result_recall``
    (share of the result tokens it keeps, over examples, layers and heads) and ``result_share``;
    over the batch's teacher caches at ``M`` slots, R-KV's lambda from the run's config."""
    teacher, tb = passes["teacher"], passes["tb"]
    cot = tb["cot_step"] >= 0
    types = tb["token_type"]
    if not bool(cot.any()) or not bool((types[cot] >= 0).all()):
        return {}  # no CoT, or tokens of unknown type
    g = torch.Generator().manual_seed(seed)
    is_result = (types == RESULT) & cot
    n_results = is_result.sum(-1)  # [B]
    out = {}
    for name in names:
        sel = get_selector(name, objective.cfg.loss.lam)
        c = compress_cache(
            sel, teacher.keys, teacher.values, teacher.queries, cot, tb["answer_valid"], passes["m"], g, None, types
        )
        idx = c.indices.permute(1, 0, 2, 3)  # [B, L, H, M]
        kept = types.gather(1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)  # the type of each kept position
        valid = c.valid.permute(1, 0, 2, 3)
        total = int(valid.sum())
        shares = {t: _round(float(((kept == i) & valid).sum()) / max(total, 1)) for i, t in enumerate(TOKEN_TYPES)}
        kept_results = ((kept == RESULT) & valid).sum().float()
        possible = (
            n_results.sum().float() * valid.shape[1] * valid.shape[2]
        )  # every result token, in every layer and head
        recall = float(kept_results / possible.clamp_min(1))
        out[name] = {
            "shares": shares,
            "result_recall": _round(recall),
            "result_share": shares["result"],
            "slots": total,
        }
    cot_types = types[cot]
    out["_cot"] = {"shares": {t: _round(float((cot_types == i).float().mean())) for i, t in enumerate(TOKEN_TYPES)}}
    return out


@torch.no_grad()
def measure(objective: Objective, encs: list[Encoded], keeps: bool = False) -> dict:
    """The instruments on ``encs`` as one batch: ``{"logit_lens": ..., "kv_alignment": ...}`` and,
    with ``keeps``, ``"selector_keeps"``."""
    with _Eval(objective.model):
        passes = _passes(objective, encs)
        out = {
            "n": len(encs),
            "logit_lens": logit_lens(objective, passes),
            "kv_alignment": kv_alignment(objective, passes),
        }
        if keeps:
            out["selector_keeps"] = selector_keeps(objective, passes)
    return out


__all__ = ["INDEX_SELECTORS", "kv_alignment", "logit_lens", "measure", "selector_keeps"]

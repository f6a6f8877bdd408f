"""What a run measures besides its loss, written into its folder (each takes the training loop's
:class:`~kava.training.loop.Run`): the teacher-student KV cosine grid of a few examples
(``kv_cosine.json``), the logit lens and KV alignment at each evaluation (``instruments.jsonl``),
and, before the first update, what every selector keeps of the teacher's cache
(``selector_keeps.json``)."""

from __future__ import annotations

import json
import logging

from ..distill.instruments import measure
from ..io import atomic_write_json

log = logging.getLogger("kava.train")


def probe_kv_cosine(run) -> None:
    """One example's teacher-student KV cosine per layer and slot, ``kv_cosine.json`` (for
    `kava report`'s heatmap). Run as a batch of a few (the shuffled control takes its
    targets from another example)."""
    objective = run.objective
    examples = run.eval_examples[:8]
    if examples and not objective.source.covers([ex.source_id for ex in examples]):
        log.info(
            "kv probe skipped: the offline teacher cache holds training examples only, not the evaluation examples "
            "(the live teacher is not what this student was distilled towards)"
        )
        return
    probe = [run.encoder.encode(ex) for ex in examples] if examples else run.encoded[:8]
    whole_batch = objective.selector is not None and objective.selector.whole_batch
    grid = objective.kv_cosine_grid(probe) if len(probe) >= 2 or not whole_batch else None
    if grid is not None:
        atomic_write_json(run.out / "kv_cosine.json", grid)


def instrument_examples(run) -> tuple[list, bool] | None:
    """The first ``eval.instrument_examples`` evaluation examples encoded (``held_out``), or training
    examples when the run loads none; None for kava runs without instruments or with fewer than 2."""
    cfg = run.cfg
    if cfg.train.mode != "kava" or not cfg.eval.instruments:
        return None
    n = cfg.eval.instrument_examples
    held_out = bool(run.eval_examples)
    encs = [run.encoder.encode(ex) for ex in run.eval_examples[:n]] if held_out else run.encoded[:n]
    return (encs, held_out) if len(encs) >= 2 else None


def record_instruments(run) -> None:
    """Append the logit lens and the KV alignment at this step to ``instruments.jsonl`` (kava runs,
    ``eval.instruments``), on the examples of :func:`instrument_examples`."""
    got = instrument_examples(run)
    if got is None:
        return
    encs, held_out = got
    row = {"step": run.step, "held_out": held_out, **measure(run.objective, encs)}
    with (run.out / "instruments.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def record_selector_keeps(run) -> None:
    """What each selector keeps of the teacher's cache, written to ``selector_keeps.json`` at step 0,
    before the first update: the teacher is then the model the run starts from (its
    ``model.init_from``, e.g. the teacher warm-up), the same for every arm of a sweep."""
    got = instrument_examples(run)
    if got is None:
        return
    encs, held_out = got
    keeps = measure(run.objective, encs, keeps=True)["selector_keeps"]
    atomic_write_json(
        run.out / "selector_keeps.json",
        {
            "step": run.step,
            "held_out": held_out,
            "n": len(encs),
            "run_selector": run.cfg.loss.compression,
            "teacher": run.cfg.model.init_from or "",
            "selectors": keeps,
        },
    )

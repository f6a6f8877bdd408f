"""Find the largest training batch that fits in memory.

:func:`find_largest_batch` tries a step at growing batch sizes (doubling), then bisects
between the last size that fitted and the first that ran out of memory. Only out-of-memory
errors are caught (``torch.cuda.OutOfMemoryError`` or a ``RuntimeError`` whose message says
"out of memory"); anything else propagates, so a bug is never mistaken for a full GPU.

The step is injectable (``step(batch_size) -> None``), which makes the search testable on a
CPU; :func:`training_step_fn` builds the real one (forward and backward of the configured
objective on the longest training examples).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger("kava.batch_finder")  # the name its log lines have always had

_OOM_TYPES: tuple[type[BaseException], ...] = tuple(
    t
    for t in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None))
    if t is not None
)


def is_oom(err: BaseException) -> bool:
    """True for an out-of-memory error from torch (CUDA or otherwise), False for anything else."""
    if _OOM_TYPES and isinstance(err, _OOM_TYPES):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def free_memory() -> None:
    """Drop what a failed step left behind so that the next try starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchSearch:
    """The outcome of a search: the largest size that fitted and every size tried."""

    largest: int  # 0 when even ``start`` did not fit
    tried: list[tuple[int, bool]] = field(default_factory=list)  # (batch size, fitted), in order

    @property
    def hit_limit(self) -> bool:
        """True when the search stopped at ``max_batch`` rather than at an out-of-memory error."""
        return all(ok for _, ok in self.tried)


def find_largest_batch(
    step: Callable[[int], object],
    start: int = 1,
    max_batch: int = 4096,
    multiple_of: int = 1,
    on_try: Callable[[int, bool], None] | None = None,
) -> BatchSearch:
    """Largest batch size ``b`` in ``[start, max_batch]`` for which ``step(b)`` runs.

    Doubles from ``start`` until a size runs out of memory (or ``max_batch`` is reached),
    then bisects. With ``multiple_of`` only multiples of it are tried (``start`` is rounded up
    to one). Assumes that memory grows with the batch size (if ``b`` fails, larger ones do).
    Returns a :class:`BatchSearch`; ``largest`` is 0 when ``start`` itself does not fit.
    """
    # Kept whole (over 60 lines): the search loop and its stopping rules read best together.
    if start < 1 or max_batch < start:
        raise ValueError(f"need 1 <= start <= max_batch, got start={start}, max_batch={max_batch}")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    start = -(-start // multiple_of) * multiple_of
    max_batch = max_batch // multiple_of * multiple_of
    if max_batch < start:
        raise ValueError(f"no multiple of {multiple_of} between start and max_batch")
    tried: list[tuple[int, bool]] = []

    def fits(b: int) -> bool:
        try:
            step(b)
            ok = True
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is an OOM
            if not is_oom(e):
                raise
            ok = False
            log.info("batch %d: out of memory", b)
        if not ok:
            free_memory()  # outside the except block: the traceback (and its tensors) is gone by now
        tried.append((b, ok))
        if on_try is not None:
            on_try(b, ok)
        return ok

    good, bad = 0, None
    b = start
    while True:
        if fits(b):
            good = b
            if b >= max_batch:
                return BatchSearch(good, tried)
            b = min(b * 2, max_batch)
        else:
            bad = b
            break
    # Bisect in units of ``multiple_of`` between good (fits, or 0) and bad (does not fit).
    lo, hi = good // multiple_of, bad // multiple_of
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid * multiple_of < start:
            break
        if fits(mid * multiple_of):
            lo = mid
        else:
            hi = mid
    return BatchSearch(lo * multiple_of, tried)


def training_step_fn(objective, encoded: list, longest: bool = True, at_step: int = 0) -> Callable[[int], None]:
    """A ``step(batch_size)`` that runs forward and backward of ``objective`` and drops the grads.

    ``encoded``: :class:`kava.data.sequences.Encoded` examples. With ``longest`` the batch is made of
    the longest examples (repeated as needed), so the size found holds for any batch.
    ``at_step``: the optimizer step whose curriculum stage the batches use.
    """
    pool = list(encoded)
    if not pool:
        raise ValueError("no examples to build batches from")
    if longest:
        pool.sort(
            key=lambda e: len(e.question) + sum(map(len, e.steps)) + len(e.answer_prefix) + len(e.answer), reverse=True
        )

    def step(batch_size: int) -> None:
        encs = [pool[i % len(pool)] for i in range(batch_size)]
        objective.zero_grad(set_to_none=True)
        try:
            loss, _ = objective(objective.make_batch(encs, at_step))
            loss.backward()
        finally:
            objective.zero_grad(set_to_none=True)

    return step


def find_batch(cfg, max_batch: int) -> dict:
    """Build the configured model and search the largest per-process training batch (``kava env --find-batch``)."""
    from contextlib import nullcontext

    from ..data.loaders import load_data
    from ..data.sequences import TextEncoder
    from ..distill.objective import Objective
    from ..model.checkpoints import build_model
    from .env import pick_mixed_precision

    if cfg.data.train_limit == 0 and cfg.data.train in ("synthetic", "synthetic-nl"):
        cfg.data.synthetic_train_size = min(cfg.data.synthetic_train_size, 2000)
    model = build_model(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    encoded = [encoder.encode(ex) for ex in load_data(cfg, "train")]
    objective = Objective(model, cfg).train()
    at_step = 10**9 if cfg.curriculum.enabled else 0  # the last curriculum stage: all latents
    mp = pick_mixed_precision(cfg.train.mixed_precision)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    step = training_step_fn(objective, encoded, at_step=at_step)

    def run(b: int) -> None:
        with torch.autocast(device.type, dtype=amp) if amp is not None and device.type == "cuda" else nullcontext():
            step(b)

    res = find_largest_batch(run, start=1, max_batch=max_batch)
    return {"largest": res.largest, "hit_limit": res.hit_limit, "tried": res.tried, "device": device.type}

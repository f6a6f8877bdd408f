"""The training loop on ``accelerate``: one script for CPU, one GPU or many.

Gradient accumulation to ``train.effective_batch``, mixed precision picked from the
hardware, AdamW with a cosine schedule and warm-up, gradient clipping, a progress bar with
the loss terms, metrics as JSONL, atomic safetensors checkpoints with everything an exact
resume needs, and a clean stop on SIGINT/SIGTERM.

:func:`train` reads top to bottom as its steps: :func:`set_up`, :func:`resume_from`,
:func:`open_run_folder`, then per optimizer step :func:`train_step`, :func:`log_metrics`,
:func:`save_checkpoint` and :func:`evaluate_model`, and at the end :func:`probe_kv_cosine`.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ConfigError, KavaConfig
from ..data.loaders import load_data
from ..data.schema import Example
from ..data.sequences import Encoded, TextEncoder
from ..distill.objective import Objective, metric_floats
from ..evaluation.evaluator import eval_modes, evaluate
from ..io import atomic_replace_dir, atomic_write_json
from ..model.backbone import KavaModel, build_model, load_weights
from ..model.checkpoints import latest_checkpoint
from .env import pick_mixed_precision
from .state import load_trainer_state, save_trainer_state

log = logging.getLogger("kava.train")  # the name these log lines have always had


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says why."""


@dataclass
class Run:
    """One training run: what :func:`set_up` builds and the later steps read and advance."""

    cfg: KavaConfig
    out: Path  # the run folder (train.output_dir)
    accelerator: Any
    model: KavaModel
    encoder: TextEncoder
    encoded: list[Encoded]  # the training examples, as token ids
    eval_examples: list[Example]  # loaded only when the run evaluates (eval_at_end, eval_every)
    objective: Objective
    wrapped: Any  # the objective as accelerate prepared it (DDP, FSDP)
    optimizer: Any
    scheduler: Any
    order: DataOrder
    accum: int  # micro-batches per optimizer step
    max_steps: int
    fsdp: bool
    step: int = 0
    writer: Any = None  # TensorBoard, with train.tensorboard
    window: dict[str, list] = field(default_factory=dict)  # metrics since the last logged row
    last_row: dict = field(default_factory=dict)  # the last row written to metrics.jsonl
    started: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """The RNGs a checkpoint saves besides torch's, numpy's and Python's."""
        return {"selector": self.objective.generator}


def train(cfg: KavaConfig, resume: bool = False) -> dict:
    """Run training as configured; returns the final metrics (and evaluation, if asked)."""
    from tqdm.auto import tqdm

    tc = cfg.train
    run = set_up(cfg)
    if resume:
        resume_from(run)
    open_run_folder(run)

    run.started = time.perf_counter()
    bar = tqdm(total=run.max_steps, initial=run.step, desc=f"train[{tc.mode}]", disable=not (run.main and tc.progress), dynamic_ncols=True)
    state = "finished"
    with _StopSignal() as stop:
        run.wrapped.train()
        while run.step < run.max_steps:
            train_step(run)
            bar.update(1)
            if run.step % tc.log_every == 0 or run.step == run.max_steps:
                log_metrics(run, bar)
            if tc.save_every and run.step % tc.save_every == 0 and run.step < run.max_steps:
                save_checkpoint(run)
            if tc.eval_every and run.step % tc.eval_every == 0 and run.step < run.max_steps and run.main and not run.fsdp:
                evaluate_model(run, run.out / f"eval-{run.step}")
            if stop.received is not None:
                state = "interrupted"
                log.warning("signal %d received: saving a checkpoint at step %d and stopping", stop.received, run.step)
                break
    bar.close()

    ckpt = save_checkpoint(run)
    result = {"state": state, "step": run.step, "max_steps": run.max_steps, "checkpoint": str(ckpt), "train": run.last_row}
    # (Both below run on the main process alone, which FSDP's sharded weights cannot do: under
    # FSDP evaluate the saved checkpoint with `kava eval` instead.)
    if run.fsdp and tc.eval_at_end and run.main:
        log.info("FSDP: skipping the evaluation at the end; run `kava eval --checkpoint %s`", ckpt)
    if state == "finished" and run.main and tc.mode == "kava" and not run.fsdp:
        probe_kv_cosine(run)
    if state == "finished" and tc.eval_at_end and run.main and run.eval_examples and not run.fsdp:
        result["eval"] = evaluate_model(run, run.out)
    if run.main:
        atomic_write_json(run.out / "status.json", result)
    if run.writer:
        run.writer.close()
    return result


def set_up(cfg: KavaConfig) -> Run:
    """Accelerator, seed, data, model, objective, optimizer and schedule, as configured."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    accelerator = Accelerator(
        mixed_precision=pick_mixed_precision(tc.mixed_precision),
        cpu=not torch.cuda.is_available(),
        # One scheduler step per optimizer step (accelerate would otherwise step it once per process).
        step_scheduler_with_optimizer=False,
        # cot/nocot never touch the latent projection; DDP must be told that some parameters get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tc.mode != "kava")],
    )
    world = accelerator.num_processes
    effective = tc.effective_batch or tc.batch_size * world
    if effective % (tc.batch_size * world):
        raise ConfigError(
            f"config field 'train.effective_batch': {effective} is not a multiple of batch_size x processes = {tc.batch_size * world}"
        )
    accum = effective // (tc.batch_size * world)
    set_seed(tc.seed)

    train_examples = load_data(cfg, "train")
    eval_examples = load_data(cfg, "eval") if tc.eval_at_end or tc.eval_every else []
    model = build_model(cfg)
    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    encoded = [encoder.encode(ex) for ex in train_examples]
    objective = Objective(model, cfg)

    steps_per_epoch = math.ceil(len(encoded) / effective)
    max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * max_steps)
    optimizer = torch.optim.AdamW(_param_groups(objective, cfg), lr=tc.lr, weight_decay=tc.weight_decay)
    if tc.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    wrapped, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    return Run(cfg, Path(tc.output_dir), accelerator, model, encoder, encoded, eval_examples, objective, wrapped,
               optimizer, scheduler, DataOrder(len(encoded), tc.seed), accum, max_steps,
               fsdp=accelerator.distributed_type == DistributedType.FSDP)


def resume_from(run: Run) -> None:
    """Continue from the latest checkpoint in the run folder, if any: the weights, the target
    source's trained parts, optimizer, scheduler, every RNG and the data position."""
    if run.fsdp:
        raise TrainingError("--resume is not supported under FSDP (checkpoints hold the gathered weights, not the sharded optimizer state); start a new run with model.init_from=CHECKPOINT")
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        log.info("no checkpoint in %s: starting from scratch", run.out)
        return
    from safetensors.torch import load_file

    load_weights(run.model, ckpt)
    source = run.objective.source
    if source.state_file:
        if not (ckpt / source.state_file).is_file():
            raise TrainingError(f"{ckpt}: no {source.state_file} to resume the teachers' adapters from (was it written without teachers.models?)")
        source.load_state_dict(load_file(str(ckpt / source.state_file)))
    progress = load_trainer_state(ckpt, run.optimizer, run.scheduler, run.generators)
    run.step = progress["step"]
    run.order = DataOrder(len(run.encoded), run.cfg.train.seed, progress["epoch"], progress["offset"])
    log.info("resumed from %s at step %d", ckpt, run.step)


def open_run_folder(run: Run) -> None:
    """The run folder with the resolved ``config.yaml`` and ``status.json`` (running); TensorBoard."""
    if not run.main:
        return
    run.out.mkdir(parents=True, exist_ok=True)
    run.cfg.save(run.out / "config.yaml")
    atomic_write_json(run.out / "status.json", {"state": "running", "step": run.step, "max_steps": run.max_steps})
    if run.cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(run.out / "tensorboard"))


def train_step(run: Run) -> None:
    """One optimizer step: ``accum`` micro-batches forward and backward (gradients synchronised
    on the last), one check that every loss was finite, clipping, the update."""
    tc, accelerator, wrapped = run.cfg.train, run.accelerator, run.wrapped
    losses_this_step = []
    for micro in range(run.accum):
        idx = run.order.take(tc.batch_size * run.world)[run.rank :: run.world]
        batch = run.objective.make_batch([run.encoded[i] for i in idx], run.step)
        sync = accelerator.no_sync(wrapped) if micro < run.accum - 1 else nullcontext()
        with sync:
            loss, metrics = wrapped(batch)
            accelerator.backward(loss / run.accum)
        losses_this_step.append(loss.detach())
        for k, v in metrics.items():
            run.window.setdefault(k, []).append(v)
    # One host read per optimizer step, after the backward passes were queued.
    if not bool(torch.isfinite(torch.stack(losses_this_step)).all()):
        bad = metric_floats({k: v[-1] for k, v in run.window.items()})
        raise TrainingError(f"non-finite loss at step {run.step}: {bad}; lower train.lr or check the data")
    if tc.grad_clip > 0:
        grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
        run.window.setdefault("grad_norm", []).append(torch.as_tensor(grad_norm).detach().float())
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1


def log_metrics(run: Run, bar) -> None:
    """The mean of every metric since the last row (over processes too): one row of
    ``metrics.jsonl`` (and TensorBoard), and the progress bar's figures."""
    row = {"step": run.step, "lr": run.scheduler.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - run.started, 3)}
    means = {k: torch.stack([torch.as_tensor(x, dtype=torch.float32, device=run.accelerator.device).reshape(()) for x in v]).mean()
             for k, v in run.window.items()}
    row.update(_mean_over_processes(run.accelerator, means))
    run.window.clear()
    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "ce", "ce_student", "kv", "codi", "kv_cos", "acc_teacher", "acc_student", "stage")})
    if run.main:
        with (run.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        if run.writer:
            for k, v in row.items():
                run.writer.add_scalar(k, v, run.step)
    run.last_row = row


def save_checkpoint(run: Run) -> Path:
    """Write ``checkpoint-STEP`` atomically: the model, the target source's trained parts
    (other teachers' aligners and router) and, except under FSDP, the trainer state."""
    at = run.step
    path = run.out / f"checkpoint-{at}"
    # FSDP shards the weights: gather them (a collective, every process takes part). Its
    # optimizer state stays sharded, so FSDP checkpoints hold weights only (no exact resume).
    state = None
    if run.fsdp:
        state = {k.removeprefix("model."): v for k, v in run.accelerator.get_state_dict(run.wrapped).items()}
    if run.main:
        source = run.objective.source

        def build(tmp: Path) -> None:
            run.model.write_to(tmp, state)
            if source.state_file:
                # Training state of the source's trained parts (the student does not need them).
                save_file({k: v.detach().cpu().contiguous() for k, v in source.state_dict().items()},
                          str(tmp / source.state_file), metadata={"format": "kava"})
            if not run.fsdp:
                save_trainer_state(tmp, run.optimizer, run.scheduler, run.generators, {"step": at, **run.order.state()})

        atomic_replace_dir(path, build)
    run.accelerator.wait_for_everyone()
    return path


def evaluate_model(run: Run, out_dir: Path) -> dict:
    """Evaluate the model on the run's evaluation examples in its own modes, into ``out_dir``."""
    res = evaluate(run.model, run.eval_examples, run.cfg, eval_modes(run.cfg), out_dir)
    for mode, r in res.items():
        log.info("eval %s [%s]: accuracy %.3f, forward passes %.2f (n=%d)", out_dir.name, mode, r["accuracy"], r["forward_passes"], r["n"])
    return res


def probe_kv_cosine(run: Run) -> None:
    """One example's teacher-student KV cosine per layer and slot, ``kv_cosine.json`` (for
    `kava report`'s heatmap). Run as a batch of a few (the shuffled control takes its
    targets from another example)."""
    objective = run.objective
    probe = [run.encoder.encode(ex) for ex in run.eval_examples[:8]] if run.eval_examples else run.encoded[:8]
    grid = objective.kv_cosine_grid(probe) if len(probe) >= 2 or objective.cfg.loss.compression != "shuffled" else None
    if grid is not None:
        atomic_write_json(run.out / "kv_cosine.json", grid)


# --- helpers -------------------------------------------------------------------------


class DataOrder:
    """Deterministic example order: a fresh seeded permutation each epoch; resumable."""

    def __init__(self, n: int, seed: int, epoch: int = 0, offset: int = 0):
        if n == 0:
            raise TrainingError("no training examples")
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.offset])
            self.offset += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def _param_groups(objective: Objective, cfg: KavaConfig) -> list[dict]:
    proj_lr = cfg.train.projection_lr or cfg.train.lr
    groups = {"decay": [], "no_decay": [], "proj_decay": [], "proj_no_decay": []}
    for name, p in objective.model.named_parameters():
        if not p.requires_grad:
            continue
        proj = name.startswith("projection.")
        key = ("proj_" if proj else "") + ("decay" if p.ndim >= 2 else "no_decay")
        groups[key].append(p)
    # What the target source trains (aligners, layer mixes and the router of other teachers):
    # no decay (adapters start at the identity).
    groups["teachers"] = objective.source.trained_parameters()
    wd = cfg.train.weight_decay
    spec = [("decay", cfg.train.lr, wd), ("no_decay", cfg.train.lr, 0.0), ("proj_decay", proj_lr, wd), ("proj_no_decay", proj_lr, 0.0),
            ("teachers", cfg.teachers.adapter_lr or cfg.train.lr, 0.0)]
    return [{"params": groups[k], "lr": lr, "weight_decay": w} for k, lr, w in spec if groups[k]]


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _mean_over_processes(accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average logged metrics (0-dim tensors) over all processes (each saw its own share of
    the batch), read back to the host in one transfer."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].to(accelerator.device, torch.float64) for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))

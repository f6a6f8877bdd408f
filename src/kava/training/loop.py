"""The training loop on ``accelerate``: one script for CPU, one GPU or many.

Gradient accumulation to ``train.effective_batch``, mixed precision picked from the
hardware, AdamW with a cosine schedule and warm-up, gradient clipping, a progress bar with
the loss terms, metrics as JSONL, atomic safetensors checkpoints with everything an exact
resume needs, and a clean stop on SIGINT/SIGTERM.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError, KavaConfig
from ..data.loaders import load_data
from ..data.sequences import TextEncoder
from ..distill.objective import Objective, metric_floats
from ..distill.targets.teachers import ALIGN_FILE
from ..evaluation.evaluator import eval_modes, evaluate
from ..io import atomic_replace_dir, atomic_write_json
from ..model.backbone import build_model
from ..model.checkpoints import WEIGHTS_FILE, latest_checkpoint
from .env import pick_mixed_precision
from .state import load_trainer_state, save_trainer_state

log = logging.getLogger("kava.train")  # the name these log lines have always had


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message says why."""


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
    # Aligners, layer mixes and the router of other teachers: no decay (adapters start at the identity).
    groups["teachers"] = [p for p in objective.teachers.parameters() if p.requires_grad] if objective.teachers is not None else []
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


def train(cfg: KavaConfig, resume: bool = False) -> dict:
    """Run training as configured; returns the final metrics (and evaluation, if asked)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    tc = cfg.train
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    out = Path(tc.output_dir)
    accelerator = Accelerator(
        mixed_precision=pick_mixed_precision(tc.mixed_precision),
        cpu=not torch.cuda.is_available(),
        # One scheduler step per optimizer step (accelerate would otherwise step it once per process).
        step_scheduler_with_optimizer=False,
        # cot/nocot never touch the latent projection; DDP must be told that some parameters get no gradient.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tc.mode != "kava")],
    )
    world, rank = accelerator.num_processes, accelerator.process_index
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
    generators = {"selector": objective.generator}

    order = DataOrder(len(encoded), tc.seed)
    step = 0
    if resume and accelerator.distributed_type == DistributedType.FSDP:
        raise TrainingError("--resume is not supported under FSDP (checkpoints hold the gathered weights, not the sharded optimizer state); start a new run with model.init_from=CHECKPOINT")
    if resume:
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(ckpt / WEIGHTS_FILE)), strict=False)
            if objective.teachers is not None:
                if not (ckpt / ALIGN_FILE).is_file():
                    raise TrainingError(f"{ckpt}: no {ALIGN_FILE} to resume the teachers' adapters from (was it written without teachers.models?)")
                objective.teachers.load_state_dict(load_file(str(ckpt / ALIGN_FILE)))
            progress = load_trainer_state(ckpt, optimizer, scheduler, generators)
            step = progress["step"]
            order = DataOrder(len(encoded), tc.seed, progress["epoch"], progress["offset"])
            log.info("resumed from %s at step %d", ckpt, step)
        else:
            log.info("no checkpoint in %s: starting from scratch", out)

    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        atomic_write_json(out / "status.json", {"state": "running", "step": step, "max_steps": max_steps})
    writer = None
    if main and tc.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))

    fsdp = accelerator.distributed_type == DistributedType.FSDP

    def save_checkpoint(at: int) -> Path:
        path = out / f"checkpoint-{at}"
        # FSDP shards the weights: gather them (a collective, every process takes part). Its
        # optimizer state stays sharded, so FSDP checkpoints hold weights only (no exact resume).
        state = None
        if fsdp:
            state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(wrapped).items()}
        if main:
            def build(tmp: Path) -> None:
                model.write_to(tmp, state)
                if objective.teachers is not None:
                    # Training state of the aligners and router (the student does not need them).
                    save_file({k: v.detach().cpu().contiguous() for k, v in objective.teachers.state_dict().items()},
                              str(tmp / ALIGN_FILE), metadata={"format": "kava"})
                if not fsdp:
                    save_trainer_state(tmp, optimizer, scheduler, generators, {"step": at, **order.state()})

            atomic_replace_dir(path, build)
        accelerator.wait_for_everyone()
        return path

    metrics_file = out / "metrics.jsonl"
    window: dict[str, list[float]] = {}
    started = time.perf_counter()
    bar = tqdm(total=max_steps, initial=step, desc=f"train[{tc.mode}]", disable=not (main and tc.progress), dynamic_ncols=True)
    final: dict = {}
    state = "finished"
    with _StopSignal() as stop:
        wrapped.train()
        while step < max_steps:
            losses_this_step = []
            for micro in range(accum):
                idx = order.take(tc.batch_size * world)[rank::world]
                batch = objective.make_batch([encoded[i] for i in idx], step)
                sync = accelerator.no_sync(wrapped) if micro < accum - 1 else nullcontext()
                with sync:
                    loss, metrics = wrapped(batch)
                    accelerator.backward(loss / accum)
                losses_this_step.append(loss.detach())
                for k, v in metrics.items():
                    window.setdefault(k, []).append(v)
            # One host read per optimizer step, after the backward passes were queued.
            if not bool(torch.isfinite(torch.stack(losses_this_step)).all()):
                bad = metric_floats({k: v[-1] for k, v in window.items()})
                raise TrainingError(f"non-finite loss at step {step}: {bad}; lower train.lr or check the data")
            if tc.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)
                window.setdefault("grad_norm", []).append(torch.as_tensor(grad_norm).detach().float())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == max_steps:
                row = {"step": step, "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - started, 3)}
                means = {k: torch.stack([torch.as_tensor(x, dtype=torch.float32, device=accelerator.device).reshape(()) for x in v]).mean()
                         for k, v in window.items()}
                row.update(_mean_over_processes(accelerator, means))
                window.clear()
                bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "ce", "ce_student", "kv", "codi", "kv_cos", "stage")})
                if main:
                    with metrics_file.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    if writer:
                        for k, v in row.items():
                            writer.add_scalar(k, v, step)
                final = row
            if tc.save_every and step % tc.save_every == 0 and step < max_steps:
                save_checkpoint(step)
            if tc.eval_every and step % tc.eval_every == 0 and step < max_steps and main and not fsdp:
                _evaluate(model, eval_examples, cfg, out / f"eval-{step}")
            if stop.received is not None:
                state = "interrupted"
                log.warning("signal %d received: saving a checkpoint at step %d and stopping", stop.received, step)
                break
    bar.close()
    ckpt = save_checkpoint(step)
    result = {"state": state, "step": step, "max_steps": max_steps, "checkpoint": str(ckpt), "train": final}
    # (Both below run on the main process alone, which FSDP's sharded weights cannot do: under
    # FSDP evaluate the saved checkpoint with `kava eval` instead.)
    if fsdp and tc.eval_at_end and main:
        log.info("FSDP: skipping the evaluation at the end; run `kava eval --checkpoint %s`", ckpt)
    if state == "finished" and main and tc.mode == "kava" and not fsdp:
        # One example's teacher-student KV cosine per layer and slot, for `kava report`'s heatmap.
        # Run as a batch of a few (the shuffled control takes its targets from another example).
        probe = [encoder.encode(ex) for ex in eval_examples[:8]] if eval_examples else encoded[:8]
        grid = objective.kv_cosine_grid(probe) if len(probe) >= 2 or objective.cfg.loss.compression != "shuffled" else None
        if grid is not None:
            atomic_write_json(out / "kv_cosine.json", grid)
    if state == "finished" and tc.eval_at_end and main and eval_examples and not fsdp:
        result["eval"] = _evaluate(model, eval_examples, cfg, out)
    if main:
        atomic_write_json(out / "status.json", result)
    if writer:
        writer.close()
    return result


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


def _evaluate(model, examples, cfg: KavaConfig, out_dir: Path) -> dict:
    res = evaluate(model, examples, cfg, eval_modes(cfg), out_dir)
    for mode, r in res.items():
        log.info("eval %s [%s]: accuracy %.3f, forward passes %.2f (n=%d)", out_dir.name, mode, r["accuracy"], r["forward_passes"], r["n"])
    return res

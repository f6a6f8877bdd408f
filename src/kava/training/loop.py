"""The training loop on ``accelerate``: one script for CPU, one GPU or many.

Gradient accumulation to ``train.effective_batch``, mixed precision picked from the
hardware, AdamW with a cosine schedule and warm-up, gradient clipping, a progress bar with
the loss terms, metrics as JSONL, atomic safetensors checkpoints with everything an exact
resume needs, and a clean stop on SIGINT/SIGTERM.

:func:`train` reads top to bottom as its steps: the run folder locked and checked
(:func:`kava.training.rundir.claim_run_folder`), :func:`set_up`, :func:`resume_from`,
:func:`open_run_folder`, then per optimizer step :func:`train_step`, :func:`log_metrics`,
:func:`save_checkpoint` and :func:`evaluate_model` (with :func:`record_instruments`), and at the
end :func:`finish` (the KV probe, the instruments and the evaluation); a run that raises is
marked failed (:func:`mark_failed`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ConfigError, KavaConfig, under_output_root
from ..data.loaders import load_data
from ..data.schema import Example
from ..data.sequences import Encoded, TextEncoder
from ..distill.objective import Objective, metric_floats
from ..evaluation.evaluator import eval_modes, evaluate
from ..io import append_line, atomic_replace_dir, atomic_write_json
from ..model.backbone import KavaModel, build_model, load_weights
from ..model.checkpoints import CHECKPOINT_RE, STATE_JSON, ModelLoadError, check_shapes, latest_checkpoint, read_tensors
from .env import pick_mixed_precision
from .rundir import check_resume_config, claim_run_folder, prune_checkpoints
from .state import load_trainer_state, save_trainer_state
from .tracking import start_trackers, tracker_names

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
    summary: dict = field(default_factory=dict)  # the start-of-run summary (run_summary.json)
    window: dict[str, list] = field(default_factory=dict)  # metrics since the last logged row
    window_tokens: int = 0  # this process's sequence tokens since the last logged row
    window_examples: int = 0  # examples (all processes) since the last logged row
    window_time: float = 0.0  # seconds spent in train_step since the last logged row
    stage: int | None = None  # the curriculum stage of the last step (None: no curriculum)
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
    """Run training as configured; returns the final metrics (and evaluation, if asked).

    Before any other work the run folder is locked and checked (:mod:`kava.training.rundir`):
    a second run into it, or a fresh start into a folder holding files without
    ``train.overwrite_output_dir``, stops with one line. ``result["signal"]`` is set when a
    SIGINT/SIGTERM stopped the run (the command exits with 128 + that number)."""
    tracker_names(cfg)  # a missing tracker package is refused before the folder is touched
    # The folder set_up will write to (under train.output_root / $KAVA_OUTPUT_ROOT), locked first.
    folder = under_output_root(cfg.train.output_dir, cfg.train.output_root)
    with claim_run_folder(folder, resume, cfg.train.overwrite_output_dir,
                          main=_is_global_rank_zero()) as clear_previous:
        if resume and latest_checkpoint(folder) is not None:
            check_resume_config(folder, cfg)  # before anything loads or is written
        return _train(cfg, resume, clear_previous)


def _is_global_rank_zero() -> bool:
    """Whether this process is rank 0 of its launch (torchrun and accelerate set ``RANK``), read
    from the environment: creating accelerate's state here would fix it before :func:`set_up`."""
    return os.environ.get("RANK", "0") == "0"


def _train(cfg: KavaConfig, resume: bool, clear_previous=lambda: None) -> dict:
    from tqdm.auto import tqdm

    tc = cfg.train
    try:
        run = set_up(cfg)
    except BaseException as e:
        if not resume and _is_global_rank_zero():  # a fresh start that never began says why (a resumed run keeps its status)
            _write_failed_start(under_output_root(cfg.train.output_dir, cfg.train.output_root), e)
        raise
    if resume:
        resume_from(run)
    previous = _read_status(run.out) if run.main and resume else None  # (a finished run's, kept if this fails)
    clear_previous()  # --overwrite: only now, with config, data, init_from and model all checked
    open_run_folder(run)
    try:
        run.started = time.perf_counter()
        bar = tqdm(total=run.max_steps, initial=run.step, desc=f"train[{tc.mode}]", disable=not (run.main and tc.progress), dynamic_ncols=True)
        with _StopSignal() as stop:
            if run.step == 0 and run.main and not run.fsdp:
                record_selector_keeps(run)  # before the first update: the model the run starts from
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
                    record_instruments(run)
                if stop.received is not None:
                    log.warning("signal %d received: saving a checkpoint at step %d and stopping", stop.received, run.step)
                    break
            bar.close()
            ckpt = save_checkpoint(run)  # (a signal during the save is held until it is done)
        result = {"state": "finished", "step": run.step, "max_steps": run.max_steps, "checkpoint": str(ckpt), "train": run.last_row}
        if stop.received is not None:
            result.update(state="interrupted", signal=stop.received)
        else:
            finish(run, ckpt, result)
        if run.main:
            atomic_write_json(run.out / "status.json", result)
    except BaseException as e:
        if run.main:
            if previous and previous.get("state") == "finished" and run.step <= int(previous.get("step") or 0):
                # A resume of a finished run that failed before training a step: the run is still
                # the finished one (its checkpoints are untouched), so its status stays so.
                log.error("the resume failed before any new step; %s keeps saying finished", run.out / "status.json")
                atomic_write_json(run.out / "status.json", previous)
            else:
                mark_failed(run, e)
        raise
    finally:
        for tracker in run.accelerator.trackers:  # (not end_training: that also destroys the process group)
            tracker.finish()
    return result


def finish(run: Run, ckpt: Path, result: dict) -> None:
    """The work after the last checkpoint: the KV probe and the evaluation at the end. A
    SIGINT/SIGTERM now stops it at once (the checkpoint is saved): the run is then
    ``interrupted`` with its ``signal``, and ``kava eval`` can evaluate the checkpoint."""
    tc = run.cfg.train
    # (Both below run on the main process alone, which FSDP's sharded weights cannot do: under
    # FSDP evaluate the saved checkpoint with `kava eval` instead.)
    if run.fsdp and tc.eval_at_end and run.main:
        log.info("FSDP: skipping the evaluation at the end; run `kava eval --checkpoint %s`", ckpt)
    try:
        with _RaiseOnSignal():
            if run.main and tc.mode == "kava" and not run.fsdp:
                probe_kv_cosine(run)
                record_instruments(run)
            if tc.eval_at_end and run.main and run.eval_examples and not run.fsdp:
                result["eval"] = evaluate_model(run, run.out)
    except _Stopped as stop:
        log.warning("signal %d received during the final evaluation: stopped; checkpoint %s is saved, "
                    "evaluate it with `kava eval --checkpoint %s`", stop.signum, ckpt, ckpt)
        result.update(state="interrupted", signal=stop.signum,
                      note=f"stopped during the final evaluation; run `kava eval --checkpoint {ckpt}`")


def _read_status(folder: Path) -> dict | None:
    """The run folder's ``status.json`` as a mapping, or None (absent, unreadable or not one)."""
    path = Path(folder) / "status.json"
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("step", 0), int) else None


def mark_failed(run: Run, error: BaseException) -> None:
    """``status.json`` says ``failed`` with the error's first line and the last checkpoint."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")[:500]
    try:
        last = latest_checkpoint(run.out)
    except ModelLoadError:  # a damaged newest checkpoint: the error being raised matters more
        last = None
    status = {"state": "failed", "step": run.step, "max_steps": run.max_steps, "error": text,
              "checkpoint": str(last) if last else None, "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        atomic_write_json(run.out / "status.json", status)
    except OSError as e:  # a full disk, say: the error being raised matters more
        log.error("could not mark %s failed: %s", run.out, e)


def _write_failed_start(folder: Path, error: BaseException) -> None:
    """A ``status.json`` saying why a fresh start failed before any work, in a folder that holds no run
    yet: an existing run's files (an ``--overwrite`` that could not start) stay as they were."""
    if (folder / "status.json").exists() or (folder / "status.json").is_symlink():
        return
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")[:500]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "status.json", {"state": "failed", "step": 0, "error": text, "checkpoint": None,
                                                   "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    except OSError as e:
        log.error("could not mark %s failed: %s", folder, e)


def set_up(cfg: KavaConfig) -> Run:
    """Accelerator, seed, data, model, objective, optimizer and schedule, as configured."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    from accelerate.utils import ProjectConfiguration

    tc = cfg.train
    trackers = tracker_names(cfg)  # a missing tracker package fails here, before anything loads
    tc.output_dir = str(under_output_root(tc.output_dir, tc.output_root))  # saved so in config.yaml
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    accelerator = Accelerator(
        mixed_precision=pick_mixed_precision(tc.mixed_precision),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=tc.output_dir, logging_dir=str(Path(tc.output_dir) / "logs")),
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
    check_positions(encoded, model, cfg)
    objective = Objective(model, cfg)

    steps_per_epoch = math.ceil(len(encoded) / effective)
    max_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    if max_steps > cfg.limits.max_steps:
        raise ConfigError(f"config field 'train.epochs': {tc.epochs:g} epochs of {steps_per_epoch} steps are "
                          f"{max_steps:,} steps, beyond the sanity bound limits.max_steps={cfg.limits.max_steps:,} "
                          "(raise it if you mean it)")
    params = list({id(p): p for p in objective.parameters()}.values())  # counted before FSDP shards them
    summary = {
        "mode": tc.mode, "examples": len(encoded), "eval_examples": len(eval_examples), "max_steps": max_steps,
        "steps_per_epoch": steps_per_epoch, "epochs": round(max_steps / steps_per_epoch, 3), "effective_batch": effective,
        "batch_size_per_process": tc.batch_size, "processes": world, "grad_accumulation_steps": accum,
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for p in params),
        "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
        "weights_dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
        "report_to": trackers,
    }
    warmup = tc.warmup_steps or int(tc.warmup_ratio * max_steps)
    optimizer = make_optimizer(_param_groups(objective, cfg), tc.lr, tc.weight_decay, fused=tc.fused_optimizer)
    if tc.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    wrapped, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    return Run(cfg, Path(tc.output_dir), accelerator, model, encoder, encoded, eval_examples, objective, wrapped,
               optimizer, scheduler, DataOrder(len(encoded), tc.seed), accum, max_steps,
               fsdp=accelerator.distributed_type == DistributedType.FSDP, summary=summary)


def check_positions(encoded: list[Encoded], model: KavaModel, cfg: KavaConfig) -> None:
    """Stop, naming the example and the fields, when the longest teacher or student sequence
    needs more positions than the model has (``max_position_embeddings``), before any step."""
    limit = getattr(model.base_model.config.get_text_config(), "max_position_embeddings", None)
    if not limit or not encoded:
        return
    latents = cfg.latent.num_latents + 2  # <bot> z_1..z_M <eot>

    def need(e: Encoded) -> int:
        return len(e.question) + max(sum(map(len, e.steps)), latents) + len(e.answer_prefix) + len(e.answer)

    worst = max(encoded, key=need)
    if need(worst) > limit:
        raise ConfigError(f"config field 'latent.num_latents': example {worst.source_id} needs {need(worst)} "
                          f"positions (question, CoT or {latents} latent slots, answer) but the model has "
                          f"max_position_embeddings={limit}; shorten data.max_question_tokens / data.max_cot_tokens "
                          "or use fewer latents")


def resume_from(run: Run) -> None:
    """Continue from the latest checkpoint in the run folder, if any: the weights, the target
    source's trained parts, optimizer, scheduler, every RNG and the data position."""
    if run.fsdp:
        raise TrainingError("--resume is not supported under FSDP (checkpoints hold the gathered weights, not the sharded optimizer state); start a new run with model.init_from=CHECKPOINT")
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        log.info("no checkpoint in %s: starting from scratch", run.out)
        return
    load_weights(run.model, ckpt)
    source = run.objective.source
    if source.state_file:
        if not (ckpt / source.state_file).is_file():
            raise TrainingError(f"{ckpt}: no {source.state_file} to resume the teachers' adapters from (was it written without teachers.models?)")
        parts = read_tensors(ckpt / source.state_file)
        check_shapes(source, parts, ckpt / source.state_file)
        source.load_state_dict(parts)
    progress = load_trainer_state(ckpt, run.optimizer, run.scheduler, run.generators)
    check_progress(progress, ckpt, run.max_steps, len(run.encoded))
    if progress.get("examples", len(run.encoded)) != len(run.encoded):
        raise TrainingError(f"--resume from {ckpt}: the run trained on {progress['examples']} examples, this data has "
                            f"{len(run.encoded)} (data.train changed?); start a new run to train on other data")
    run.step = progress["step"]
    run.order = DataOrder(len(run.encoded), run.cfg.train.seed, progress["epoch"], progress["offset"])
    log.info("resumed from %s at step %d", ckpt, run.step)


def check_progress(progress: Any, ckpt: Path, max_steps: int, examples: int) -> None:
    """Stop, naming the file, when a trainer state's progress is not what ``ckpt`` can hold: a
    step that is not an integer, differs from the folder's ``checkpoint-N``, or lies beyond
    ``train.max_steps``; a data offset beyond the training examples."""
    where = ckpt / STATE_JSON
    m = CHECKPOINT_RE.match(ckpt.name)
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not isinstance(progress, dict) or not all(ok(progress.get(k)) for k in ("step", "epoch", "offset")):
        shown = {k: progress.get(k) for k in ("step", "epoch", "offset")} if isinstance(progress, dict) else progress
        raise ModelLoadError(f"{where}: progress {shown!r} is not a kava trainer state "
                             "(step, epoch, offset: integers >= 0)")
    step = progress["step"]
    if m and int(m.group(1)) != step:
        raise ModelLoadError(f"{where}: step {step} but the folder is {ckpt.name}: damaged or edited, "
                             "not resuming from it")
    if step > max_steps:
        raise ModelLoadError(f"{where}: step {step} is beyond train.max_steps={max_steps}; "
                             f"set train.max_steps >= {step} to continue this run")
    if progress["offset"] > examples:
        raise ModelLoadError(f"{where}: data offset {progress['offset']} is beyond the {examples} training examples "
                             "(other data than the run's?)")


def open_run_folder(run: Run) -> None:
    """The run folder with the resolved ``config.yaml``, ``status.json`` (running) and
    ``run_summary.json`` (also logged); the trackers of ``train.report_to``."""
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        run.cfg.save(run.out / "config.yaml")
        atomic_write_json(run.out / "status.json", {"state": "running", "step": run.step, "max_steps": run.max_steps})
        atomic_write_json(run.out / "run_summary.json", {**run.summary, "start_step": run.step})
        log.info("%s", format_summary(run.summary))
    start_trackers(run.accelerator, run.cfg, run.out, run.summary)


def format_summary(s: dict) -> str:
    """The start-of-run summary as one line."""
    return (f"run: {s['examples']} training examples, {s['max_steps']} steps ({s['epochs']:g} epochs), effective batch "
            f"{s['effective_batch']} ({s['batch_size_per_process']} x {s['processes']} process(es) x {s['grad_accumulation_steps']} "
            f"accumulation), {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters trainable, "
            f"device {s['device']}, mixed precision {s['mixed_precision']}, weights {s['weights_dtype']}"
            + (f", reporting to {', '.join(s['report_to'])}" if s["report_to"] else ""))


def train_step(run: Run) -> None:
    """One optimizer step: ``accum`` micro-batches forward and backward (gradients synchronised
    on the last), one check that every loss was finite, clipping, the update."""
    tc, accelerator, wrapped = run.cfg.train, run.accelerator, run.wrapped
    started = time.perf_counter()
    losses_this_step = []
    for micro in range(run.accum):
        idx = run.order.take(tc.batch_size * run.world)[run.rank :: run.world]
        batch = run.objective.make_batch([run.encoded[i] for i in idx], run.step)
        run.window_tokens += batch_tokens(batch)  # host-side masks: no device sync
        run.stage = batch.get("stage")
        sync = accelerator.no_sync(wrapped) if micro < run.accum - 1 else nullcontext()
        with sync:
            loss, metrics = wrapped(batch)
            accelerator.backward(loss / run.accum)
        losses_this_step.append(loss.detach())
        for k, v in metrics.items():
            if k != "stage":  # logged as the integer it is, not averaged (log_metrics)
                run.window.setdefault(k, []).append(v)
    checked = torch.stack(losses_this_step).float()
    if tc.grad_clip > 0:
        grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(wrapped.parameters(), tc.grad_clip)).detach().float()
        run.window.setdefault("grad_norm", []).append(grad_norm)
        checked = torch.cat([checked, grad_norm.to(checked.device).reshape(1)])
    # One host read per optimizer step, after the backward passes were queued: a non-finite
    # loss or gradient norm stops the run before the update can poison the weights.
    if not bool(torch.isfinite(checked).all()):
        bad = metric_floats({k: v[-1] for k, v in run.window.items()})
        raise TrainingError(f"non-finite loss or gradient at step {run.step}: {bad}; lower train.lr or check the data")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.window_examples += tc.batch_size * run.world * run.accum
    run.window_time += time.perf_counter() - started  # the step ends with a host read (the finiteness check)


def log_metrics(run: Run, bar) -> None:
    """The mean of every metric since the last row (over processes too): one row of
    ``metrics.jsonl`` (and the trackers), and the progress bar's figures.

    Besides the loss terms a row has ``time`` (UTC), ``lr``, ``examples_per_s`` and
    ``tokens_per_s`` (all processes; time spent in training steps since the previous row, so
    checkpoints and evaluations do not count), ``peak_mem_gib`` (CUDA memory allocated on a GPU,
    the process's peak resident memory on a CPU) and the curriculum ``stage`` as an integer."""
    row = {"step": run.step, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "lr": run.scheduler.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - run.started, 3)}
    device = run.accelerator.device
    means = {k: torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(()) for x in v]).mean()
             for k, v in run.window.items()}
    means["_tokens"] = torch.tensor(float(run.window_tokens))
    values = _mean_over_processes(run.accelerator, means)  # the one host read of the logging step
    tokens = values.pop("_tokens") * run.world
    row.update(values)
    if run.window_time > 0:
        row["examples_per_s"] = round(run.window_examples / run.window_time, 3)
        row["tokens_per_s"] = round(tokens / run.window_time, 1)
    row["peak_mem_gib"] = round(peak_memory_gib(device), 4)
    if run.stage is not None:
        row["stage"] = int(run.stage)
    run.window.clear()
    run.window_tokens = run.window_examples = 0
    run.window_time = 0.0
    bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k in ("loss", "ce", "ce_student", "kv", "codi", "kv_cos", "acc_teacher", "acc_student", "stage")})
    if run.main:
        append_line(run.out / "metrics.jsonl", json.dumps(row))
    run.accelerator.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=run.step)
    run.last_row = row


def batch_tokens(batch: dict) -> int:
    """Sequence tokens of a batch the model reads: the teacher's (question, CoT, answer) and the
    student's (prefix, latents, suffix), padding excluded. The masks are host tensors."""
    n = 0
    if "teacher" in batch:
        n += int(batch["teacher"]["attention_mask"].sum())
    if "student" in batch:
        s = batch["student"]
        n += int(s["prefix_mask"].sum()) + int(s["suffix_mask"].sum()) + s["num_latents"] * s["prefix_mask"].shape[0]
    return n


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device`` so far, or on a CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


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
        check_finite_weights(run, state)
        source = run.objective.source

        def build(tmp: Path) -> None:
            run.model.write_to(tmp, state)
            if source.state_file:
                # Training state of the source's trained parts (the student does not need them).
                save_file({k: v.detach().cpu().contiguous() for k, v in source.state_dict().items()},
                          str(tmp / source.state_file), metadata={"format": "kava"})
            if not run.fsdp:
                save_trainer_state(tmp, run.optimizer, run.scheduler, run.generators, {"step": at, "examples": len(run.encoded), **run.order.state()})

        atomic_replace_dir(path, build)
        for gone in prune_checkpoints(run.out, run.cfg.train.save_total_limit):
            log.info("train.save_total_limit=%d: deleted %s", run.cfg.train.save_total_limit, gone.name)
    run.accelerator.wait_for_everyone()
    return path


def check_finite_weights(run: Run, state: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse to write a checkpoint whose trained weights hold NaN or inf (``--resume`` would
    load the poisoned weights and fail again): the last good checkpoint stays the latest."""
    if state is not None:
        named = list(state.items())
    else:
        named = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
        named += [(f"source.{n}", p) for n, p in run.objective.source.state_dict().items()] if run.objective.source.state_file else []
    if not named:
        return
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if not bool(flags.all()):
        bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
        raise TrainingError(f"non-finite weights at step {run.step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                            f"checkpoint-{run.step} not written; lower train.lr or check the data")


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
    examples = run.eval_examples[:8]
    if examples and not objective.source.covers([ex.source_id for ex in examples]):
        log.info("kv probe skipped: the offline teacher cache holds training examples only, not the evaluation examples "
                 "(the live teacher is not what this student was distilled towards)")
        return
    probe = [run.encoder.encode(ex) for ex in examples] if examples else run.encoded[:8]
    grid = objective.kv_cosine_grid(probe) if len(probe) >= 2 or objective.cfg.loss.compression != "shuffled" else None
    if grid is not None:
        atomic_write_json(run.out / "kv_cosine.json", grid)


def _instrument_examples(run: Run) -> tuple[list, bool] | None:
    """The first ``eval.instrument_examples`` evaluation examples encoded (``held_out``), or training
    examples when the run loads none; None for kava runs without instruments or with fewer than 2."""
    cfg = run.cfg
    if cfg.train.mode != "kava" or not cfg.eval.instruments:
        return None
    n = cfg.eval.instrument_examples
    held_out = bool(run.eval_examples)
    encs = [run.encoder.encode(ex) for ex in run.eval_examples[:n]] if held_out else run.encoded[:n]
    return (encs, held_out) if len(encs) >= 2 else None


def record_instruments(run: Run) -> None:
    """Append the logit lens and the KV alignment at this step to ``instruments.jsonl`` (kava runs,
    ``eval.instruments``), on the examples of :func:`_instrument_examples`."""
    got = _instrument_examples(run)
    if got is None:
        return
    from ..distill.instruments import measure

    encs, held_out = got
    row = {"step": run.step, "held_out": held_out, **measure(run.objective, encs)}
    with (run.out / "instruments.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


def record_selector_keeps(run: Run) -> None:
    """What each selector keeps of the teacher's cache, written to ``selector_keeps.json`` at step 0,
    before the first update: the teacher is then the model the run starts from (its
    ``model.init_from``, e.g. the teacher warm-up), the same for every arm of a sweep."""
    got = _instrument_examples(run)
    if got is None:
        return
    from ..distill.instruments import measure

    encs, held_out = got
    keeps = measure(run.objective, encs, keeps=True)["selector_keeps"]
    atomic_write_json(run.out / "selector_keeps.json", {"step": run.step, "held_out": held_out, "n": len(encs),
                                                        "run_selector": run.cfg.loss.compression,
                                                        "teacher": run.cfg.model.init_from or "", "selectors": keeps})


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


def fused_unsupported(params: list[torch.Tensor]) -> str | None:
    """Why torch's fused AdamW cannot update ``params`` (a device without its kernel, a
    non-float parameter), or None when it can."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # an older or newer torch without that helper: the two devices known to have it
        devices = {"cpu", "cuda"}
    for p in params:
        if p.device.type not in devices:
            return f"no fused AdamW kernel for device {p.device.type}"
        if not torch.is_floating_point(p):
            return f"a {p.dtype} parameter"
    return None


def make_optimizer(groups: list[dict], lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over ``groups``: torch's fused kernel when ``fused`` and every parameter allows it
    (one kernel over all tensors instead of a Python loop over them; the same updates to rounding),
    else the for-loop AdamW, saying once why. A resumed run keeps the implementation its
    checkpoint's optimizer state names (torch restores ``fused`` with the param groups)."""
    if fused:
        why = fused_unsupported([p for g in groups for p in g["params"]])
        if why is None:
            return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=True)
        log.info("train.fused_optimizer: %s; using the for-loop AdamW", why)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


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


class _Stopped(BaseException):
    """A SIGINT/SIGTERM during the work after the last checkpoint (no step to finish first)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _SignalHandlers:
    """Installs ``self._handle`` for SIGINT/SIGTERM for the duration of a ``with`` block and
    restores the previous handlers after it."""

    def __init__(self):
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        raise NotImplementedError

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _RaiseOnSignal(_SignalHandlers):
    """SIGINT/SIGTERM raise :class:`_Stopped` at once (a BaseException, so no handler of
    ordinary errors swallows it)."""

    def _handle(self, signum, frame):
        raise _Stopped(signum)


class _StopSignal(_SignalHandlers):
    """Turns SIGINT/SIGTERM into a flag checked between optimizer steps."""

    def __init__(self):
        super().__init__()
        self.received: int | None = None

    def _handle(self, signum, frame):
        self.received = signum


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

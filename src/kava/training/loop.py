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

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import ConfigError, KavaConfig, under_output_root
from ..data.loaders import load_data
from ..data.schema import Example
from ..data.sequences import Encoded, TextEncoder
from ..distill.objective import Objective, metric_floats
from ..distill.targets import check_targets
from ..evaluation.evaluator import eval_modes, evaluate
from ..io import atomic_replace_dir, atomic_write_json
from ..model.backbone import KavaModel
from ..model.checkpoints import (
    CHECKPOINT_RE,
    STATE_JSON,
    build_model,
    latest_checkpoint,
    load_weights,
    write_checkpoint,
)
from ..model.files import ModelLoadError, check_shapes, read_tensors
from .env import pick_mixed_precision
from .errors import TrainingError
from .metrics import batch_tokens, format_summary, log_metrics
from .optim import make_optimizer, param_groups
from .probes import probe_kv_cosine, record_instruments, record_selector_keeps
from .rundir import (
    check_resume_config,
    claim_run_folder,
    prune_checkpoints,
    read_status,
    write_failed_start,
    write_failed_status,
)
from .signals import RaiseOnSignal, Stopped, StopSignal
from .state import DataOrder, load_trainer_state, save_trainer_state
from .tracking import start_trackers, tracker_names

log = logging.getLogger("kava.train")  # the name these log lines have always had


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
    check_targets(cfg)  # and a selector its target source cannot serve
    # The folder set_up will write to (under train.output_root / $KAVA_OUTPUT_ROOT), locked first.
    folder = under_output_root(cfg.train.output_dir, cfg.train.output_root)
    with claim_run_folder(
        folder, resume, cfg.train.overwrite_output_dir, main=_is_global_rank_zero()
    ) as clear_previous:
        if resume and latest_checkpoint(folder) is not None:
            check_resume_config(folder, cfg)  # before anything loads or is written
        return _train(cfg, resume, clear_previous)


def _is_global_rank_zero() -> bool:
    """Whether this process is rank 0 of its launch (torchrun and accelerate set ``RANK``), read
    from the environment: creating accelerate's state here would fix it before :func:`set_up`."""
    return os.environ.get("RANK", "0") == "0"


def on_cadence(run: Run, bar) -> None:
    """What the step just taken is due for: a metrics row, a checkpoint, an evaluation with the
    instruments (at ``train.log_every``, ``save_every`` and ``eval_every``; the last step's are
    the run's end)."""
    tc, step = run.cfg.train, run.step
    if step % tc.log_every == 0 or step == run.max_steps:
        log_metrics(run, bar)
    if tc.save_every and step % tc.save_every == 0 and step < run.max_steps:
        save_checkpoint(run)
    if tc.eval_every and step % tc.eval_every == 0 and step < run.max_steps and run.main and not run.fsdp:
        evaluate_model(run, run.out / f"eval-{step}")
        record_instruments(run)


def _train(cfg: KavaConfig, resume: bool, clear_previous=lambda: None) -> dict:
    # Kept whole (over 60 lines): the run's life from start to status.json, with its signal and failure paths.
    from tqdm.auto import tqdm

    tc = cfg.train
    try:
        run = set_up(cfg)
    except BaseException as e:
        # A fresh start that never began says why (a resumed run keeps its status).
        if not resume and _is_global_rank_zero():
            write_failed_start(under_output_root(cfg.train.output_dir, cfg.train.output_root), e)
        raise
    if resume:
        resume_from(run)
    previous = read_status(run.out) if run.main and resume else None  # (a finished run's, kept if this fails)
    clear_previous()  # --overwrite: only now, with config, data, init_from and model all checked
    open_run_folder(run)
    try:
        run.started = time.perf_counter()
        bar = tqdm(
            total=run.max_steps,
            initial=run.step,
            desc=f"train[{tc.mode}]",
            disable=not (run.main and tc.progress),
            dynamic_ncols=True,
        )
        with StopSignal() as stop:
            if run.step == 0 and run.main and not run.fsdp:
                record_selector_keeps(run)  # before the first update: the model the run starts from
            run.wrapped.train()
            while run.step < run.max_steps:
                train_step(run)
                bar.update(1)
                on_cadence(run, bar)
                if stop.received is not None:
                    log.warning(
                        "signal %d received: saving a checkpoint at step %d and stopping", stop.received, run.step
                    )
                    break
            bar.close()
            ckpt = save_checkpoint(run)  # (a signal during the save is held until it is done)
        result = {
            "state": "finished",
            "step": run.step,
            "max_steps": run.max_steps,
            "checkpoint": str(ckpt),
            "train": run.last_row,
        }
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
    """The work after the last checkpoint (with ``train.eval_at_end``): the KV probe, the
    instruments and the evaluation at the end. A
    SIGINT/SIGTERM now stops it at once (the checkpoint is saved): the run is then
    ``interrupted`` with its ``signal``, and ``kava eval`` can evaluate the checkpoint."""
    tc = run.cfg.train
    # (Both below run on the main process alone, which FSDP's sharded weights cannot do: under
    # FSDP evaluate the saved checkpoint with `kava eval` instead.)
    if run.fsdp and tc.eval_at_end and run.main:
        log.info("FSDP: skipping the evaluation at the end; run `kava eval --checkpoint %s`", ckpt)
    try:
        with RaiseOnSignal():
            if tc.eval_at_end and run.main and tc.mode == "kava" and not run.fsdp:  # measurements, like the evaluation
                probe_kv_cosine(run)
                record_instruments(run)
            if tc.eval_at_end and run.main and run.eval_examples and not run.fsdp:
                result["eval"] = evaluate_model(run, run.out)
    except Stopped as stop:
        log.warning(
            "signal %d received during the final evaluation: stopped; checkpoint %s is saved, "
            "evaluate it with `kava eval --checkpoint %s`",
            stop.signum,
            ckpt,
            ckpt,
        )
        result.update(
            state="interrupted",
            signal=stop.signum,
            note=f"stopped during the final evaluation; run `kava eval --checkpoint {ckpt}`",
        )


def mark_failed(run: Run, error: BaseException) -> None:
    """``status.json`` says ``failed`` with the error's first line and the last checkpoint."""
    write_failed_status(run.out, error, run.step, run.max_steps)


def set_up(cfg: KavaConfig) -> Run:
    """Accelerator, seed, data, model, objective, optimizer and schedule, as configured."""
    # Kept whole (over 60 lines): every part of a run built in dependency order (data, model,
    # objective, optimizer, accelerate).
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, set_seed
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

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
            f"config field 'train.effective_batch': {effective} is not a multiple of batch_size x processes = "
            f"{tc.batch_size * world}"
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
        raise ConfigError(
            f"config field 'train.epochs': {tc.epochs:g} epochs of {steps_per_epoch} steps are "
            f"{max_steps:,} steps, beyond the sanity bound limits.max_steps={cfg.limits.max_steps:,} "
            "(raise it if you mean it)"
        )
    params = list({id(p): p for p in objective.parameters()}.values())  # counted before FSDP shards them
    summary = {
        "mode": tc.mode,
        "examples": len(encoded),
        "eval_examples": len(eval_examples),
        "max_steps": max_steps,
        "steps_per_epoch": steps_per_epoch,
        "epochs": round(max_steps / steps_per_epoch, 3),
        "effective_batch": effective,
        "batch_size_per_process": tc.batch_size,
        "processes": world,
        "grad_accumulation_steps": accum,
        "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
        "total_parameters": sum(p.numel() for p in params),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "weights_dtype": str(next(iter(model.parameters())).dtype).removeprefix("torch."),
        "report_to": trackers,
    }
    warmup = tc.warmup_steps or int(tc.warmup_ratio * max_steps)
    optimizer = make_optimizer(param_groups(objective, cfg), tc.lr, tc.weight_decay, fused=tc.fused_optimizer)
    if tc.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    wrapped, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    return Run(
        cfg,
        Path(tc.output_dir),
        accelerator,
        model,
        encoder,
        encoded,
        eval_examples,
        objective,
        wrapped,
        optimizer,
        scheduler,
        DataOrder(len(encoded), tc.seed),
        accum,
        max_steps,
        fsdp=accelerator.distributed_type == DistributedType.FSDP,
        summary=summary,
    )


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
        raise ConfigError(
            f"config field 'latent.num_latents': example {worst.source_id} needs {need(worst)} "
            f"positions (question, CoT or {latents} latent slots, answer) but the model has "
            f"max_position_embeddings={limit}; shorten data.max_question_tokens / data.max_cot_tokens "
            "or use fewer latents"
        )


def resume_from(run: Run) -> None:
    """Continue from the latest checkpoint in the run folder, if any: the weights, the target
    source's trained parts, optimizer, scheduler, every RNG and the data position."""
    if run.fsdp:
        raise TrainingError(
            "--resume is not supported under FSDP (checkpoints hold the gathered weights, not the sharded optimizer "
            "state); start a new run with model.init_from=CHECKPOINT"
        )
    ckpt = latest_checkpoint(run.out)
    if ckpt is None:
        log.info("no checkpoint in %s: starting from scratch", run.out)
        return
    load_weights(run.model, ckpt)
    source = run.objective.source
    if source.state_file:
        if not (ckpt / source.state_file).is_file():
            raise TrainingError(
                f"{ckpt}: no {source.state_file} to resume the teachers' adapters from (was it written without "
                "teachers.models?)"
            )
        parts = read_tensors(ckpt / source.state_file)
        check_shapes(source, parts, ckpt / source.state_file)
        source.load_state_dict(parts)
    progress = load_trainer_state(ckpt, run.optimizer, run.scheduler, run.generators)
    check_progress(progress, ckpt, run.max_steps, len(run.encoded))
    if progress.get("examples", len(run.encoded)) != len(run.encoded):
        raise TrainingError(
            f"--resume from {ckpt}: the run trained on {progress['examples']} examples, this data has "
            f"{len(run.encoded)} (data.train changed?); start a new run to train on other data"
        )
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
        raise ModelLoadError(
            f"{where}: progress {shown!r} is not a kava trainer state (step, epoch, offset: integers >= 0)"
        )
    step = progress["step"]
    if m and int(m.group(1)) != step:
        raise ModelLoadError(
            f"{where}: step {step} but the folder is {ckpt.name}: damaged or edited, not resuming from it"
        )
    if step > max_steps:
        raise ModelLoadError(
            f"{where}: step {step} is beyond train.max_steps={max_steps}; "
            f"set train.max_steps >= {step} to continue this run"
        )
    if progress["offset"] > examples:
        raise ModelLoadError(
            f"{where}: data offset {progress['offset']} is beyond the {examples} training examples "
            "(other data than the run's?)"
        )


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
            write_checkpoint(run.model, tmp, state)
            if source.state_file:
                # Training state of the source's trained parts (the student does not need them).
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in source.state_dict().items()},
                    str(tmp / source.state_file),
                    metadata={"format": "kava"},
                )
            if not run.fsdp:
                save_trainer_state(
                    tmp,
                    run.optimizer,
                    run.scheduler,
                    run.generators,
                    {"step": at, "examples": len(run.encoded), **run.order.state()},
                )

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
        named += (
            [(f"source.{n}", p) for n, p in run.objective.source.state_dict().items()]
            if run.objective.source.state_file
            else []
        )
    if not named:
        return
    flags = torch.stack([torch.isfinite(t.detach()).all() for _, t in named])
    if not bool(flags.all()):
        bad = [n for (n, _), ok in zip(named, flags.tolist()) if not ok]
        raise TrainingError(
            f"non-finite weights at step {run.step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
            f"checkpoint-{run.step} not written; lower train.lr or check the data"
        )


def evaluate_model(run: Run, out_dir: Path) -> dict:
    """Evaluate the model on the run's evaluation examples in its own modes, into ``out_dir``."""
    res = evaluate(run.model, run.eval_examples, run.cfg, eval_modes(run.cfg), out_dir)
    for mode, r in res.items():
        log.info(
            "eval %s [%s]: accuracy %.3f, forward passes %.2f (n=%d)",
            out_dir.name,
            mode,
            r["accuracy"],
            r["forward_passes"],
            r["n"],
        )
    return res


# --- helpers -------------------------------------------------------------------------

"""What a run logs as it trains: a row of ``metrics.jsonl`` (and the trackers) at every
``train.log_every`` steps, averaged over the window and the processes (each takes the training
loop's :class:`~kava.training.loop.Run`), the tokens a batch holds, peak memory, and the
start-of-run summary line."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime, timezone

import torch

from ..io import append_line


def log_metrics(run, bar) -> None:
    """The mean of every metric since the last row (over processes too): one row of
    ``metrics.jsonl`` (and the trackers), and the progress bar's figures.

    Besides the loss terms a row has ``time`` (UTC), ``lr``, ``examples_per_s`` and
    ``tokens_per_s`` (all processes; time spent in training steps since the previous row, so
    checkpoints and evaluations do not count), ``peak_mem_gib`` (CUDA memory allocated on a GPU,
    the process's peak resident memory on a CPU) and the curriculum ``stage`` as an integer."""
    row = {
        "step": run.step,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lr": run.scheduler.get_last_lr()[0],
        "elapsed_s": round(time.perf_counter() - run.started, 3),
    }
    device = run.accelerator.device
    means = {
        k: torch.stack([torch.as_tensor(x, dtype=torch.float32, device=device).reshape(()) for x in v]).mean()
        for k, v in run.window.items()
    }
    means["_tokens"] = torch.tensor(float(run.window_tokens))
    values = mean_over_processes(run.accelerator, means)  # the one host read of the logging step
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
    bar.set_postfix(
        {
            k: f"{v:.3g}"
            for k, v in row.items()
            if k in ("loss", "ce", "ce_student", "kv", "codi", "kv_cos", "acc_teacher", "acc_student", "stage")
        }
    )
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


def format_summary(s: dict) -> str:
    """The start-of-run summary as one line."""
    return (
        f"run: {s['examples']} training examples, {s['max_steps']} steps ({s['epochs']:g} epochs), effective batch "
        f"{s['effective_batch']} ({s['batch_size_per_process']} x {s['processes']} process(es) x "
        f"{s['grad_accumulation_steps']} "
        f"accumulation), {s['trainable_parameters']:,} of {s['total_parameters']:,} parameters trainable, "
        f"device {s['device']}, mixed precision {s['mixed_precision']}, weights {s['weights_dtype']}"
        + (f", reporting to {', '.join(s['report_to'])}" if s["report_to"] else "")
    )


def mean_over_processes(accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average logged metrics (0-dim tensors) over all processes (each saw its own share of
    the batch), read back to the host in one transfer."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.stack([values[k].to(accelerator.device, torch.float64) for k in keys])
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="mean")
    return dict(zip(keys, t.tolist()))

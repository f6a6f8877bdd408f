"""What this machine is and what a training run would pick on it (``kava env``).

:func:`environment_report` returns a plain dict: devices and their memory, host memory, the
versions of the libraries that matter, the distributed setting seen in the environment, and
for a configuration the settings :func:`kava.training.train` would pick (mixed precision, weight
dtype, device, gradient accumulation...) together with warnings about settings that cannot
work here.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

import torch

from ..config import KavaConfig

LIBRARIES = ("torch", "transformers", "accelerate", "peft", "datasets", "safetensors", "bitsandbytes", "flash-attn", "kava")


def pick_mixed_precision(setting: str) -> str:
    """``auto``: bf16 where the GPU supports it, else fp16 on a GPU, else none."""
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def library_versions() -> dict[str, str | None]:
    """Installed version of each library in :data:`LIBRARIES` (None when not installed); kava's
    own is the imported package's (its distribution is called kava-latent)."""
    from .. import __version__

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        if name == "kava":
            out[name] = __version__
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_memory() -> dict[str, float | None]:
    """Total and available host memory in GiB (from /proc/meminfo; None where unknown)."""
    info: dict[str, float] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, rest = line.split(":", 1)
                info[key] = float(rest.split()[0]) / 2**20  # kB -> GiB
    except OSError:
        pass
    total = info.get("MemTotal")
    if total is None:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError, AttributeError):
            total = None
    return {"total_gib": _r(total), "available_gib": _r(info.get("MemAvailable"))}


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def gpu_devices() -> list[dict]:
    """One entry per visible CUDA device: name, compute capability, memory, bf16 support."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError:
            free, total = None, p.total_memory
        out.append({
            "index": i,
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_total_gib": _r(total / 2**30),
            "memory_free_gib": None if free is None else _r(free / 2**30),
            "bf16": bool(torch.cuda.is_bf16_supported()),
        })
    return out


def distributed_env() -> dict:
    """World size and ranks as a launcher (torchrun, accelerate launch, srun) sets them."""
    def env_int(*names: str, default: int) -> int:
        for n in names:
            if os.environ.get(n, "").strip().isdigit():
                return int(os.environ[n])
        return default

    return {
        "world_size": env_int("WORLD_SIZE", default=1),
        "rank": env_int("RANK", default=0),
        "local_rank": env_int("LOCAL_RANK", default=0),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodes": env_int("SLURM_NNODES", "SLURM_JOB_NUM_NODES", default=0) or None,
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
    }


def picked_settings(cfg: KavaConfig, world_size: int = 1) -> tuple[dict, list[str]]:
    """The settings :func:`kava.training.train` would use for ``cfg`` here, and warnings."""
    from ..model.backbone import resolve_dtype

    cuda = torch.cuda.is_available()
    tc, mc = cfg.train, cfg.model
    warnings: list[str] = []
    per_step = tc.batch_size * world_size
    effective = tc.effective_batch or per_step
    accum: int | None = effective // per_step
    if effective % per_step:
        warnings.append(f"train.effective_batch={effective} is not a multiple of batch_size x processes = {per_step}: training would refuse to start")
        accum = None
    mp = pick_mixed_precision(tc.mixed_precision)
    dtype = str(resolve_dtype(mc.dtype)).removeprefix("torch.")
    if mp in ("bf16", "fp16") and not cuda:
        warnings.append(f"train.mixed_precision={mp} without a CUDA GPU")
    if mp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        warnings.append("train.mixed_precision=bf16 but this GPU does not support bfloat16")
    if mc.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        warnings.append("model.attn_implementation=flash_attention_2 but flash-attn is not installed")
    if mc.quantization != "none":
        if not cuda:
            warnings.append(f"model.quantization={mc.quantization} needs a CUDA GPU: loading would fail here")
        elif importlib.util.find_spec("bitsandbytes") is None:
            warnings.append(f"model.quantization={mc.quantization} needs bitsandbytes: pip install bitsandbytes")
    settings = {
        "device": "cuda" if cuda else "cpu",
        "processes": world_size,
        "mixed_precision": mp,
        "weights_dtype": dtype,
        "attn_implementation": mc.attn_implementation,
        "adapter": mc.adapter,
        "quantization": mc.quantization,
        "gradient_checkpointing": mc.gradient_checkpointing,
        "batch_size_per_process": tc.batch_size,
        "effective_batch": effective,
        "grad_accumulation_steps": accum,
        "torch_threads": tc.num_threads or torch.get_num_threads(),
    }
    return settings, warnings


def environment_report(cfg: KavaConfig | None = None) -> dict:
    """Everything ``kava env`` prints, as a dict (JSON-serialisable)."""
    dist = distributed_env()
    cfg = cfg or KavaConfig()
    settings, warnings = picked_settings(cfg, dist["world_size"])
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "host_memory": host_memory(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": gpu_devices(),
        "libraries": library_versions(),
        "distributed": dist,
        "settings": settings,
        "warnings": warnings,
    }


def format_report(report: dict) -> str:
    """A readable, line-per-fact rendering of :func:`environment_report`."""
    lines = [
        f"python        {report['python']} on {report['platform']}",
        f"cpus          {report['cpu_count']}",
        f"host memory   {report['host_memory']['total_gib']} GiB total, {report['host_memory']['available_gib']} GiB available",
        f"cuda          {'yes, CUDA ' + str(report['cuda_version']) if report['cuda_available'] else 'no (CPU only)'}",
    ]
    for g in report["gpus"]:
        lines.append(
            f"gpu {g['index']}         {g['name']} (sm {g['capability']}), {g['memory_total_gib']} GiB total, "
            f"{g['memory_free_gib']} GiB free, bf16 {'yes' if g['bf16'] else 'no'}"
        )
    d = report["distributed"]
    lines.append(f"distributed   world size {d['world_size']}, rank {d['rank']}, local rank {d['local_rank']}, backend {d['backend']}"
                 + (f", SLURM job {d['slurm_job']} on {d['slurm_nodes']} node(s)" if d["slurm_job"] else ""))
    lines.append("libraries     " + ", ".join(f"{k} {v or '-'}" for k, v in report["libraries"].items()))
    lines.append("would use:")
    for k, v in report["settings"].items():
        lines.append(f"  {k:<24}{v}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)

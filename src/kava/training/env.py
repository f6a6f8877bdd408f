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
import re
import sys
from collections.abc import Mapping

import torch

from ..config import KavaConfig

LIBRARIES = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "datasets",
    "safetensors",
    "bitsandbytes",
    "flash-attn",
    "kava",
)


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
        out.append(
            {
                "index": i,
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_total_gib": _r(total / 2**30),
                "memory_free_gib": None if free is None else _r(free / 2**30),
                "bf16": bool(torch.cuda.is_bf16_supported()),
            }
        )
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
        "job": scheduler_job(),
    }


def expand_hostlist(nodelist: str) -> list[str]:
    """A SLURM node list such as ``gpu[01-03,07],login1`` as host names (``gpu01 gpu02 gpu03
    gpu07 login1``), zero padding kept; one bracket group per name, as SLURM writes them."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]*)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo + suffix)
                continue
            hosts += [f"{prefix}{i:0{len(lo)}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
    return hosts


def _lines(path: str | None) -> list[str]:
    """Non-empty lines of a scheduler's host file ([] when unset or unreadable)."""
    if not path:
        return []
    try:
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError:
        return []


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def scheduler_job(env: Mapping[str, str] | None = None) -> dict | None:
    """The batch job this process runs in, read from the scheduler's environment variables:
    SLURM, PBS/Torque, SGE (Grid Engine) or LSF; None outside a job.

    Gives ``scheduler``, ``job_id``, ``job_name``, ``queue``, ``array_index``, ``hosts`` (one
    entry per node), ``nodes``, ``slots`` (tasks/ranks the job was given), ``rank`` (this
    process's task, where the scheduler says) and ``gpus`` (the GPUs it was given, as the
    scheduler writes them; else ``CUDA_VISIBLE_DEVICES``)."""
    # Kept whole (over 60 lines): one scheduler after another (SLURM, PBS, LSF, ...), each a few lines.
    env = os.environ if env is None else env
    get = env.get
    if get("SLURM_JOB_ID"):
        hosts = expand_hostlist(get("SLURM_JOB_NODELIST") or get("SLURM_NODELIST") or "")
        job = {
            "scheduler": "SLURM",
            "job_id": get("SLURM_JOB_ID"),
            "job_name": get("SLURM_JOB_NAME"),
            "queue": get("SLURM_JOB_PARTITION"),
            "array_index": get("SLURM_ARRAY_TASK_ID"),
            "hosts": hosts,
            "nodes": _int(get("SLURM_JOB_NUM_NODES")) or _int(get("SLURM_NNODES")) or (len(hosts) or None),
            "slots": _int(get("SLURM_NTASKS")) or _int(get("SLURM_NPROCS")),
            "rank": _int(get("SLURM_PROCID")),
            "gpus": get("SLURM_JOB_GPUS") or get("SLURM_GPUS_ON_NODE") or get("SLURM_GPUS"),
        }
    elif get("PBS_JOBID"):
        slots = _lines(get("PBS_NODEFILE"))  # one line per slot (Torque: per core; PBS Pro: per MPI rank)
        hosts = _unique(slots)
        gpus = _lines(get("PBS_GPUFILE"))  # Torque: one line per GPU, e.g. node01-gpu0
        job = {
            "scheduler": "PBS",
            "job_id": get("PBS_JOBID"),
            "job_name": get("PBS_JOBNAME"),
            "queue": get("PBS_QUEUE"),
            "array_index": get("PBS_ARRAY_INDEX") or get("PBS_ARRAYID"),
            "hosts": hosts,
            "nodes": _int(get("PBS_NUM_NODES")) or (len(hosts) or None),
            "slots": len(slots) or _int(get("PBS_NP")) or _int(get("NCPUS")),
            "rank": _int(get("PBS_VNODENUM")),
            "gpus": ",".join(gpus) or None,
        }
    elif get("JOB_ID") and (get("SGE_ROOT") or get("SGE_TASK_ID") or get("PE_HOSTFILE")):
        # PE_HOSTFILE: "host slots queue processors" per line
        rows = [line.split() for line in _lines(get("PE_HOSTFILE"))]
        task = get("SGE_TASK_ID")
        job = {
            "scheduler": "SGE",
            "job_id": get("JOB_ID"),
            "job_name": get("JOB_NAME"),
            "queue": get("QUEUE"),
            "array_index": None if task in (None, "undefined") else task,
            "hosts": _unique([r[0] for r in rows]),
            "nodes": _int(get("NHOSTS")) or (len(rows) or None),
            "slots": _int(get("NSLOTS")) or (sum(int(r[1]) for r in rows if len(r) > 1 and r[1].isdigit()) or None),
            "rank": None,
            "gpus": get("SGE_HGR_gpu") or get("SGE_HGR_gpus"),
        }
    elif get("LSB_JOBID"):
        # LSB_MCPU_HOSTS: "hostA 4 hostB 4"; LSB_HOSTS: one name per slot
        mcpu = (get("LSB_MCPU_HOSTS") or "").split()
        pairs = list(zip(mcpu[::2], mcpu[1::2]))
        per_slot = (get("LSB_HOSTS") or "").split()
        hosts = _unique([h for h, _ in pairs] or per_slot)
        index = get("LSB_JOBINDEX")
        job = {
            "scheduler": "LSF",
            "job_id": get("LSB_JOBID"),
            "job_name": get("LSB_JOBNAME"),
            "queue": get("LSB_QUEUE"),
            "array_index": None if index in (None, "0") else index,
            "hosts": hosts,
            "nodes": len(hosts) or None,
            "slots": _int(get("LSB_DJOB_NUMPROC"))
            or (sum(int(n) for _, n in pairs if n.isdigit()) or len(per_slot) or None),
            "rank": None,
            "gpus": None,
        }
    else:
        return None
    job["gpus"] = job["gpus"] or get("CUDA_VISIBLE_DEVICES")
    return job


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
        warnings.append(
            f"train.effective_batch={effective} is not a multiple of batch_size x processes = {per_step}: training "
            "would refuse to start"
        )
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
        f"host memory   {report['host_memory']['total_gib']} GiB total, {report['host_memory']['available_gib']} GiB "
        "available",
        f"cuda          {'yes, CUDA ' + str(report['cuda_version']) if report['cuda_available'] else 'no (CPU only)'}",
    ]
    for g in report["gpus"]:
        lines.append(
            f"gpu {g['index']}         {g['name']} (sm {g['capability']}), {g['memory_total_gib']} GiB total, "
            f"{g['memory_free_gib']} GiB free, bf16 {'yes' if g['bf16'] else 'no'}"
        )
    d = report["distributed"]
    lines.append(
        f"distributed   world size {d['world_size']}, rank {d['rank']}, local rank {d['local_rank']}, backend "
        f"{d['backend']}"
    )
    job = d.get("job")
    if job:
        hosts = job["hosts"]
        shown = ", ".join(hosts[:8]) + (f", ... ({len(hosts)} in all)" if len(hosts) > 8 else "")
        parts = [
            f"{job['scheduler']} job {job['job_id']}" + (f" ({job['job_name']})" if job["job_name"] else ""),
            f"queue {job['queue']}" if job["queue"] else "",
            f"array index {job['array_index']}" if job["array_index"] else "",
            f"{job['nodes']} node(s)" + (f": {shown}" if hosts else "") if job["nodes"] else "",
            f"{job['slots']} slot(s)" if job["slots"] else "",
            f"rank {job['rank']}" if job["rank"] is not None else "",
            f"gpus {job['gpus']}" if job["gpus"] else "",
        ]
        lines.append("job           " + ", ".join(p for p in parts if p))
    lines.append("libraries     " + ", ".join(f"{k} {v or '-'}" for k, v in report["libraries"].items()))
    lines.append("would use:")
    for k, v in report["settings"].items():
        lines.append(f"  {k:<24}{v}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)

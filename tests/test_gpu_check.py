"""The GPU check's pieces on a CPU: bench_step.py's MFU peak, decoding batches and batch search,
gpu_check.py's input checks, and (slow) the whole `gpu_check.sh --smoke` end to end."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _script("bench_step")


@pytest.fixture(scope="module")
def check():
    return _script("gpu_check")


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H100 NVL", 835),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA L40S", 362),
        ("NVIDIA L40", 181),
        ("NVIDIA L4", 121),
    ],
)
def test_bf16_peak_by_device_name(bench, name, tflops):
    peak, source = bench.bf16_peak(name)
    assert peak == tflops * 1e12 and source.startswith("table")


def test_bf16_peak_unknown_device_and_override(bench):
    peak, source = bench.bf16_peak("NVIDIA GeForce GTX 1080")
    assert peak is None and "KAVA_PEAK_TFLOPS" in source
    assert bench.bf16_peak("NVIDIA H200", 500.0) == (500e12, "override")


def test_bad_peak_and_decode_batches_are_argument_errors(bench, monkeypatch, capsys):
    monkeypatch.setenv("KAVA_PEAK_TFLOPS", "fast")
    with pytest.raises(SystemExit):
        bench.parse_args([])
    assert "--peak-tflops" in capsys.readouterr().err
    monkeypatch.delenv("KAVA_PEAK_TFLOPS")
    for bad in ("0,4", "one"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--decode-batches", bad])
        assert "--decode-batches" in capsys.readouterr().err
    assert bench.parse_args(["--decode-batches", "1,64"]).decode_batches == [1, 64]


def test_benchmark_decode_batches_batch_search_and_mfu(bench, tmp_path):
    cfg = tiny_config()
    cfg.save(tmp_path / "cfg.yaml")
    r = bench.main(
        [
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--batch",
            "3",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--decode-batches",
            "1,3,5",
            "--find-batch",
            "--max-batch",
            "7",
            "--peak-tflops",
            "2",
        ]
    )
    by = r["inference_by_batch"]
    assert list(by) == ["1", "3", "5"] and [by[k]["batch"] for k in by] == [1, 3, 5]
    assert by["3"] is r["inference"]  # the training batch is not decoded twice
    assert all(d["latent"]["passes"] < d["cot"]["passes"] and d["latent"]["wall_s"] > 0 for d in by.values())
    # Doubling from the batch (3, 6), then the limit (7): all fit on a CPU, so the limit was hit.
    assert r["batch_search"]["tried"] == [(3, True), (6, True), (7, True)]
    assert r["batch_search"]["hit_limit"] and r["largest_batch"] == 7
    t = r["train"]["kava"]
    assert r["peak_source"] == "override" and t["mfu"] == pytest.approx(t["model_tflops_per_s"] / 2)


def test_check_refuses_a_gguf_that_differs_from_the_bundle(check, tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setenv("SMOLLM2_GGUF", str(gguf))
    (tmp_path / f"{check.GGUF_NAME}.sha256").write_text(f"{hashlib.sha256(b'other').hexdigest()}  {check.GGUF_NAME}\n")
    with pytest.raises(check.CheckError, match="sha256 differs"):
        check.find_gguf(tmp_path)
    (tmp_path / f"{check.GGUF_NAME}.sha256").write_text(f"{hashlib.sha256(gguf.read_bytes()).hexdigest()}  x\n")
    assert check.find_gguf(tmp_path) == gguf.resolve()
    monkeypatch.setenv("SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(check.CheckError, match="no such file"):
        check.find_gguf(tmp_path)


def test_check_without_data_files_is_a_one_line_error(check, tmp_path, monkeypatch, capsys):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("SMOLLM2_GGUF", str(gguf))
    rc = check.main(
        [
            "run",
            "--parts",
            "smollm2",
            "--bundle",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and check.TRAIN_FILE in err and "prepare" in err
    # What ran before the error is still written, with the error.
    assert "Stopped early" in (tmp_path / "out" / "summary.md").read_text()
    assert check.TRAIN_FILE in json.loads((tmp_path / "out" / "summary.json").read_text())["error"]


BUNDLE = Path(os.environ.get("KAVA_BUNDLE", ROOT / ".gpu-bundle"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (BUNDLE / "wheels").is_dir(), reason="no bundle: run `bash benchmarks/gpu_check.sh prepare` first"
)
def test_smoke_run_end_to_end(tmp_path):
    """Every part of the check at its smallest size (several minutes on 2 cores)."""
    env = {**os.environ, "PYTHON": sys.executable, "KAVA_BUNDLE": str(BUNDLE)}
    env.pop("OUT", None)
    subprocess.run(
        [
            "bash",
            str(ROOT / "benchmarks/gpu_check.sh"),
            "--smoke",
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
        ],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    r = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert r["smoke"] and "error" not in r
    assert set(r["bench"]) == {"nogc", "gc"} and r["bench"]["gc"]["model"]["gradient_checkpointing"]
    assert set(r["bench"]["nogc"]["inference_by_batch"]) == {"1", "4"}
    methods = r["smollm2"]["methods"]
    assert set(methods) == {"kava", "codi", "cot", "nocot"}
    assert all(m["steps"] == 2 and m["n"] == 4 and 0 <= m["accuracy"] <= 1 for m in methods.values())
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "SMOKE RUN" in md and "| KaVa (R-KV) |" in md and "| (c) full KaVa step |" in md


@pytest.mark.parametrize("name", ["cot", "nocot", "codi", "kava"])
def test_gpu_configs_are_the_smollm2_recipes_resized(name):
    """configs/gpu/ changes the data files and the sizing only, never the recipe."""
    from dataclasses import asdict

    from kava.config import load_config

    gpu, ref = (
        asdict(load_config(ROOT / f"configs/gpu/{name}.yaml")),
        asdict(load_config(ROOT / f"configs/smollm2/{name}.yaml")),
    )
    resized = {
        ("data", "train"),
        ("data", "eval"),
        ("train", "max_steps"),
        ("train", "batch_size"),
        ("train", "effective_batch"),
        ("train", "log_every"),
        ("train", "output_dir"),
        ("eval", "batch_size"),
    }
    differ = {(s, k) for s in ref for k in ref[s] if gpu[s][k] != ref[s][k]}
    assert differ == resized

"""Scale and speed: multi-process training, gradient checkpointing, the batch finder, the
environment report, quantisation settings, the copy-free new-token rows and the benchmark."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from kava.config import ConfigError, load_config
from kava.data.schema import Example
from kava.data.sequences import TextEncoder
from kava.distill.objective import Objective, metric_floats
from kava.model import WEIGHTS_FILE, ModelLoadError, build_model, quantization_config
from kava.training import pick_mixed_precision, train
from kava.training.batch_finder import BatchSearch, find_largest_batch, is_oom, training_step_fn

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [
    Example("7*2-7", ("<<7*2=4>>", "<<4-7=7>>"), "7", "a"),
    Example("3+4+1+2", ("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), "0", "b"),
    Example("5*5", ("<<5*5=5>>",), "5", "c"),
    Example("9-3-3", ("<<9-3=6>>", "<<6-3=3>>"), "3", "d"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- multi-process training (DDP over gloo on the CPU) -------------------------------------

_DDP_SCRIPT = """
import sys
from kava.config import load_config
from kava.training import train
for path in sys.argv[1:]:
    train(load_config(path))
"""


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_match_one_process_with_the_same_effective_batch(tmp_path):
    """batch 2 x 2 processes == batch 4 x 1 process: same metrics at every step, same weights.

    Also on two processes: the same run with gradient checkpointing (same metrics), and ``cot``
    mode, whose latent projection gets no gradient, which DDP only accepts when told
    (find_unused_parameters)."""
    loss = {"compression": "rkv", "alpha_codi": 0.0, "layer_std": False}
    common = dict(loss=loss, data={"synthetic_train_size": 32})
    one = tiny_config(train={"batch_size": 4, "max_steps": 3, "output_dir": str(tmp_path / "one")}, **common)
    two = tiny_config(train={"batch_size": 2, "max_steps": 3, "output_dir": str(tmp_path / "two")}, **common)
    ckpt = tiny_config(
        train={"batch_size": 2, "max_steps": 3, "output_dir": str(tmp_path / "ckpt")},
        model={"gradient_checkpointing": True},
        **common,
    )
    cot = tiny_config(
        train={"mode": "cot", "batch_size": 2, "max_steps": 2, "output_dir": str(tmp_path / "cot")}, **common
    )
    for name, cfg in (("two", two), ("ckpt", ckpt), ("cot", cot)):
        cfg.save(tmp_path / f"{name}.yaml")
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(script),
    ] + [str(tmp_path / f"{n}.yaml") for n in ("two", "ckpt", "cot")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(one)

    a, b, c = (_rows(tmp_path / n / "metrics.jsonl") for n in ("one", "two", "ckpt"))
    assert [r["step"] for r in a] == [r["step"] for r in b] == [r["step"] for r in c] == [1, 2, 3]  # rank 0 writes
    for ra, rb, rc in zip(a, b, c):
        assert ra["lr"] == pytest.approx(rb["lr"], rel=1e-9)  # the schedule steps once per optimizer step
        for k in ("loss", "ce_student", "ce_teacher", "kv", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["step"], k)
            assert rc[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (rc["step"], k)
    wa = load_file(str(tmp_path / "one" / "checkpoint-3" / WEIGHTS_FILE))
    wb = load_file(str(tmp_path / "two" / "checkpoint-3" / WEIGHTS_FILE))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert [r["step"] for r in _rows(tmp_path / "cot" / "metrics.jsonl")] == [1, 2]
    assert (tmp_path / "cot" / "checkpoint-2" / WEIGHTS_FILE).is_file()


# --- gradient checkpointing ---------------------------------------------------------------


def _step(adapter: str, scheme: str, checkpointing: bool, saved: dict | None = None, compile: str = "none"):
    torch.manual_seed(0)  # new-token rows and LoRA are initialised from the global generator
    cfg = tiny_config(
        model={
            "adapter": adapter,
            "lora_r": 4,
            "lora_dropout": 0.1,
            "gradient_checkpointing": checkpointing,
            "compile": compile,
        },
        latent={"scheme": scheme, "projection_dropout": 0.1},
        loss={"latent_ce": 1.0},
    )
    model = build_model(cfg)
    obj = Objective(model, cfg).train()
    enc = TextEncoder(model.tokenizer, cfg.data)
    batch = obj.make_batch([enc.encode(e) for e in EXAMPLES])
    torch.manual_seed(1)  # the same dropout masks in both runs
    if saved is None:
        loss, metrics = obj(batch)
    else:
        params = {t.untyped_storage().data_ptr() for t in model.parameters()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, metrics = obj(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return metric_floats(metrics), grads


@pytest.mark.parametrize("adapter", ["full", "lora"])
@pytest.mark.parametrize("scheme", ["jacobi", "sequential"])
def test_gradient_checkpointing_keeps_loss_and_gradients(adapter, scheme):
    """The latent passes read the KV cache inside checkpointed layers: same loss terms, same grads."""
    m0, g0 = _step(adapter, scheme, False)
    m1, g1 = _step(adapter, scheme, True)
    assert m0.keys() == m1.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-6, abs=1e-7), k
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_compiled_mlps_keep_loss_gradients_and_checkpoint_names():
    """model.compile=mlp: the same loss terms and gradients as the plain model (LoRA, dropout on),
    and the same parameter names, so its checkpoints are the plain model's."""
    m0, g0 = _step("lora", "jacobi", False)
    m1, g1 = _step("lora", "jacobi", False, compile="mlp")
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)
    model = build_model(tiny_config(model={"compile": "mlp"}))
    assert all(layer.mlp._compiled_call_impl is not None for layer in model.decoder.layers)
    assert all(layer.self_attn._compiled_call_impl is None for layer in model.decoder.layers)
    assert set(model.state_dict()) == set(build_model(tiny_config()).state_dict())
    with pytest.raises(ConfigError, match="model.compile"):
        tiny_config(model={"compile": "layers"})


def test_gradient_checkpointing_saves_activation_memory_and_leaves_eval_alone():
    plain, ckpt = {}, {}
    _step("lora", "jacobi", False, plain)
    _step("lora", "jacobi", True, ckpt)
    assert sum(ckpt.values()) < 0.5 * sum(plain.values())
    # In eval mode (generation) the layers run as they are and the cache fills normally.
    cfg = tiny_config(model={"gradient_checkpointing": True})
    model = build_model(cfg).eval()
    from kava.evaluation import generate

    enc = TextEncoder(model.tokenizer, cfg.data)
    gen = generate(model, [enc.encode(e) for e in EXAMPLES], "student", cfg)
    assert len(gen.tokens) == 4 and all(gen.tokens)


def test_teacher_runs_once_per_step(monkeypatch):
    import kava.distill.objective as ko

    calls = {"teacher": 0, "run": 0}
    real = ko.teacher_forward

    def counted(*a, **kw):
        calls["teacher"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(ko, "teacher_forward", counted)
    cfg = tiny_config(latent={"scheme": "jacobi", "iterations": 3})
    model = build_model(cfg)
    inner = model.run

    def run(*a, **kw):
        calls["run"] += 1
        return inner(*a, **kw)

    model.run = run
    obj = Objective(model, cfg)
    enc = TextEncoder(model.tokenizer, cfg.data)
    obj(obj.make_batch([enc.encode(e) for e in EXAMPLES]))
    assert calls == {"teacher": 1, "run": 1 + 3 + 1}  # teacher, T Jacobi passes, the final pass


# --- batch finder ---------------------------------------------------------------------------


def _fake_step(limit: int, error=None, log=None):
    def step(b):
        if log is not None:
            log.append(b)
        if b > limit:
            raise error if error is not None else RuntimeError(f"CUDA out of memory. Tried to allocate {b} GiB")

    return step


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8, 13, 100, 511])
def test_batch_finder_returns_the_largest_size_that_fits(limit):
    res = find_largest_batch(_fake_step(limit), start=1, max_batch=4096)
    assert res.largest == limit
    assert not res.hit_limit
    assert (limit, True) in res.tried and (limit + 1, False) in res.tried


def test_batch_finder_limits_and_multiples():
    log = []
    res = find_largest_batch(_fake_step(10**6, log=log), start=3, max_batch=40)
    assert res.largest == 40 and res.hit_limit and log == [3, 6, 12, 24, 40]
    assert find_largest_batch(_fake_step(37), start=1, max_batch=1000, multiple_of=8).largest == 32
    assert find_largest_batch(_fake_step(2), start=4).largest == 0  # even the first size does not fit
    seen = []
    find_largest_batch(_fake_step(9), on_try=lambda b, ok: seen.append((b, ok)))
    assert seen[-1] == (9, True) or (9, True) in seen
    with pytest.raises(ValueError):
        find_largest_batch(_fake_step(1), start=0)


def test_batch_finder_catches_only_out_of_memory():
    oom_type = torch.cuda.OutOfMemoryError
    assert find_largest_batch(_fake_step(6, error=oom_type("CUDA error")), max_batch=64).largest == 6
    assert is_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried... out of memory"))
    assert not is_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_oom(ValueError("out of memory"))  # only RuntimeErrors (and torch's OOM types) count
    with pytest.raises(RuntimeError, match="shapes"):
        find_largest_batch(_fake_step(3, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(KeyError):
        find_largest_batch(_fake_step(3, error=KeyError("bug")))


def test_batch_finder_with_a_real_training_step():
    cfg = tiny_config()
    model = build_model(cfg)
    obj = Objective(model, cfg).train()
    enc = TextEncoder(model.tokenizer, cfg.data)
    step = training_step_fn(obj, [enc.encode(e) for e in EXAMPLES])
    res = find_largest_batch(step, start=1, max_batch=6)
    assert isinstance(res, BatchSearch) and res.largest == 6 and res.hit_limit
    assert all(p.grad is None for p in model.parameters())


# --- environment report and `kava env` ------------------------------------------------------


def test_environment_report_fields():
    from kava.training.env import environment_report, format_report

    cfg = tiny_config(train={"batch_size": 3, "effective_batch": 8}, model={"attn_implementation": "sdpa"})
    r = environment_report(cfg)
    assert {
        "python",
        "platform",
        "cpu_count",
        "host_memory",
        "cuda_available",
        "gpus",
        "libraries",
        "distributed",
        "settings",
        "warnings",
    } <= r.keys()
    assert r["libraries"]["torch"] and r["libraries"]["transformers"] and r["libraries"]["accelerate"]
    s = r["settings"]
    assert s["mixed_precision"] == pick_mixed_precision(cfg.train.mixed_precision)
    assert s["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert s["weights_dtype"] in ("float32", "bfloat16", "float16")
    assert s["grad_accumulation_steps"] is None and any("effective_batch" in w for w in r["warnings"])
    assert r["host_memory"]["total_gib"] is None or r["host_memory"]["total_gib"] > 0
    assert len(r["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    text = format_report(r)
    assert "mixed_precision" in text and "torch" in text
    json.dumps(r)  # serialisable


def test_kava_env_command(capsys, tmp_path):
    import argparse

    from kava.cli import env as commands_env

    p = argparse.ArgumentParser(prog="kava")
    commands_env.register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["env", "--json", "train.batch_size=4", "train.effective_batch=8"])
    assert args.func(args) == 0
    r = json.loads(capsys.readouterr().out)
    if r["distributed"]["world_size"] == 1:
        assert r["settings"]["grad_accumulation_steps"] == 2 and r["settings"]["effective_batch"] == 8
    args = p.parse_args(["env"])
    assert args.func(args) == 0
    assert "would use" in capsys.readouterr().out


# --- 4-bit / 8-bit base weights -----------------------------------------------------------


def test_quantization_config_is_validated():
    ok = load_config(None, ["model.name_or_path=some/model", "model.adapter=lora", "model.quantization=4bit"])
    assert ok.model.quantization == "4bit"
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config(None, ["model.quantization=3bit"])
    with pytest.raises(ConfigError, match="adapter=lora"):
        load_config(None, ["model.name_or_path=some/model", "model.adapter=full", "model.quantization=8bit"])
    with pytest.raises(ConfigError, match="model.quantization"):
        load_config(None, ["model.name_or_path=tiny", "model.adapter=lora", "model.quantization=4bit"])
    assert quantization_config(load_config(None).model) is None


def test_quantization_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(None, ["model.name_or_path=some/model", "model.adapter=lora", "model.quantization=8bit"])
    with pytest.raises(ModelLoadError, match="CUDA"):
        quantization_config(cfg.model)
    from kava.training.env import picked_settings

    _, warnings = picked_settings(cfg)
    assert any("quantization" in w for w in warnings)


# --- the trained <bot>/<eot> rows without copying the vocabulary matrix ---------------------


@pytest.mark.parametrize("tied", [True, False])
def test_fast_trainable_tokens_match_peft(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kava.model import add_latent_tokens, apply_adapter
    from kava.model.tokenizer import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    conf = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(conf)
    ids = add_latent_tokens(tok, lm)
    peft_model = apply_adapter(lm, tiny_config(model={"adapter": "lora", "lora_r": 4}).model, list(ids))
    base = peft_model.get_base_model()
    emb, head = base.get_input_embeddings().token_adapter, base.get_output_embeddings()
    delta = emb.trainable_tokens_delta["default"]
    with torch.no_grad():
        delta.normal_()
    x = torch.tensor([[1, ids[0], 5, ids[1], ids[0]]])
    outs = []
    for fast in (True, False):
        h = emb(x) if fast else emb.forward_adapters(x, emb.active_adapters)
        if tied:
            ha = head.token_adapter
            logits = head(h) if fast else ha.forward_adapters(h, ha.active_adapters)
        else:
            logits = head(h)
        loss = logits.square().mean() + h.sum()
        outs.append((h.detach(), logits.detach(), *torch.autograd.grad(loss, delta)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- the benchmark runs ---------------------------------------------------------------------


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = tiny_config(latent={"scheme": "jacobi", "iterations": 2}, loss={"latent_ce": 1.0})
    cfg.save(tmp_path / "cfg.yaml")
    r = bench.main(
        [
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--batch",
            "4",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--device",
            "cpu",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert set(r["train"]) == {"cot", "passes", "kava"}
    assert (
        r["train"]["cot"]["passes"] == 1 and r["train"]["passes"]["passes"] == r["train"]["kava"]["passes"] == 1 + 2 + 1
    )
    assert r["inference"]["latent"]["passes"] < r["inference"]["cot"]["passes"]
    assert r["inference"]["latent"]["kv_cache_bytes_per_example"] > 0
    assert 0 <= r["summary"]["selection_losses_share"] < 1
    shares = r["summary"]["phase_shares"]
    assert shares.keys() == {"teacher pass", "student passes", "selection", "losses", "other"}
    assert sum(shares.values()) == pytest.approx(1.0) and shares["teacher pass"] > 0 and shares["student passes"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["targets"].keys() == r["targets"].keys()


def test_options_benchmark_compares_the_same_maths(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_options", ROOT / "benchmarks" / "bench_options.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(
        ["--option", "model.attn_implementation=eager", "--shape", "4x6x2x2", "--iters", "2", "--warmup", "0"]
        + ["--device", "cpu", "--json", str(tmp_path / "r.json")]
    )
    (c,) = r["results"]
    assert c["option"] == "model.attn_implementation=eager" and c["loss_difference"] < 1e-4  # eager = SDPA's maths
    assert c["ratio"]["low"] <= c["ratio"]["median"] <= c["ratio"]["high"] and c["ms_per_example"]["option"] > 0
    shape = json.loads((tmp_path / "r.json").read_text())["shape"]
    assert shape == {"batch": 4, "cot": 6, "latents": 2, "iterations": 2}
    with pytest.raises(SystemExit):
        bench.parse_args(["--option", "model.compile"])

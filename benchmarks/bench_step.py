"""Training-step and decoding benchmark for KaVa (see benchmarks/README.md).

For one model and batch it times, with the same examples:

  (a) cot      a plain CoT fine-tuning step on the teacher sequence (forward + backward, CE)
  (b) passes   the model passes a KaVa step cannot avoid: the teacher pass (when the step runs
               it, and with a graph only when Objective.teacher_needs_graph()) and the
               student's T+1 passes (Jacobi) or M+1 (sequential) with backward, CE losses only
  (c) kava     the full KaVa step (Objective: + answer-query capture, cache selection, KV/CODI losses)

and, on their own, the teacher-cache selection and the KV/CODI loss terms (forward + backward),
as a share of (c). Every phase calls the objective's own parts (Objective.ce_loss,
teacher_pass, student_pass, student_states, the target source's targets and compare), and
decoding calls evaluation's prefill and greedy, so the benchmark times what training and
evaluation run. For inference it decodes the same batch in latent mode and in CoT mode
(greedy, with the KV cache, lengths fixed to the examples' own so that random weights decode
as many tokens as a trained model would) and reports forward passes, wall time and KV-cache
bytes. Targets: (c) within 10% of (b); selection + losses at most 3% of (c); latent decoding
speed-up at least 80% of the forward-pass ratio.

  python benchmarks/bench_step.py                       # tiny model of configs/curriculum/kava.yaml
  python benchmarks/bench_step.py --model llama-1b      # Llama-3.2-1B shape, random weights (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Llama-3.2-1B (meta-llama/Llama-3.2-1B-Instruct config.json), built with random weights.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=True,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
)

# Dense (not sparse) bf16 tensor-core peak FLOP/s from NVIDIA's data sheets, for model FLOPs
# utilisation; the first name found in torch.cuda.get_device_name() wins, so the more specific
# names come first. KAVA_PEAK_TFLOPS (or --peak-tflops) overrides it, for any device.
PEAK_BF16 = (
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
)


def bf16_peak(device_name: str, override_tflops: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for a device name; (None, reason) when unknown."""
    if override_tflops > 0:
        return override_tflops * 1e12, "override"
    for name, flops in PEAK_BF16:
        if name in device_name:
            return flops, f"table: {name}"
    return None, f"no bf16 peak known for {device_name!r}; set KAVA_PEAK_TFLOPS"


# --- setup ----------------------------------------------------------------------------------


def build(args):
    """(cfg, model, encoded examples, device, autocast dtype or None)."""
    from kava.config import load_config
    from kava.data import load_data
    from kava.data.sequences import Encoded, TextEncoder
    from kava.model import build_model, resolve_dtype, wrap_backbone
    from kava.training import pick_mixed_precision

    device = torch.device(
        "cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda" else "cpu"
    )
    if args.model == "llama-1b":
        config = args.config or str(ROOT / "configs/paper/llama1b_aug.yaml")
    else:
        config = args.config or str(ROOT / "configs/curriculum/kava.yaml")
    overrides = ["model.init_from=", "train.mode=kava", *args.overrides]
    if args.model == "llama-1b":
        overrides.append("model.name_or_path=tiny")  # the tokenizer: ids only matter for shapes
    if args.batch:
        overrides.append(f"train.batch_size={args.batch}")
    if args.gradient_checkpointing:
        overrides.append("model.gradient_checkpointing=true")
    cfg = load_config(config, overrides)
    if device.type == "cpu":
        cfg.model.dtype = "float32" if cfg.model.dtype == "auto" else cfg.model.dtype
    mp = pick_mixed_precision(cfg.train.mixed_precision) if device.type == "cuda" else "no"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)

    if args.model == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        from kava.model.tokenizer import build_synthetic_tokenizer

        tok = build_synthetic_tokenizer()
        conf = dict(LLAMA_1B)
        if args.layers:
            conf["num_hidden_layers"] = args.layers
        lc = LlamaConfig(
            **conf, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
        )
        lc._attn_implementation = cfg.model.attn_implementation
        dtype = resolve_dtype(cfg.model.dtype) if device.type == "cuda" else torch.float32
        torch.manual_seed(cfg.train.seed)
        with device:
            backbone = LlamaForCausalLM(lc).to(dtype)
        model = wrap_backbone(cfg, tok, backbone, base_reloadable=True)
        encoder = TextEncoder(tok, cfg.data)
        g = torch.Generator().manual_seed(0)
        lo, hi = 10, min(len(tok) - 4, 60)

        def rand(n):
            return torch.randint(lo, hi, (n,), generator=g).tolist()

        n_ex = max(cfg.train.batch_size, 8)
        encoded = [
            Encoded(
                rand(args.question_tokens),
                [rand(args.step_tokens) for _ in range(args.cot_steps)],
                list(encoder.answer_prefix_ids),
                rand(args.answer_tokens - 1) + [tok.eos_token_id],
                [-100] * args.cot_steps,
            )
            for _ in range(n_ex)
        ]
    else:
        cfg.data.synthetic_train_size = min(cfg.data.synthetic_train_size, 1000)
        model = build_model(cfg)
        encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
        encoded = [encoder.encode(ex) for ex in load_data(cfg, "train")]
    model.to(device)
    return cfg, model, encoded, device, amp


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def count_positions(model):
    """Count the decoder passes and the positions fed to them (sum over passes of batch x new tokens)."""
    box = {"positions": 0, "passes": 0}

    def hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x  # (a pass given token ids embeds them itself)
        box["positions"] += x.shape[0] * x.shape[1]
        box["passes"] += 1

    handle = model.decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def saved_activation_bytes(fn, model) -> int:
    """Bytes of the distinct tensors (not parameters) autograd keeps for the backward pass of ``fn``."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(backward=False)
    return sum(seen.values())


def peak_memory(fn, device, model) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_bytes": peak, "step_bytes": peak - base}
    return {"saved_activation_bytes": saved_activation_bytes(fn, model)}


def interleaved_times(
    fns: dict, warmup: int, iters: int, device, alternate: bool = False, clock=time.perf_counter
) -> dict[str, list[float]]:
    """Run the functions round-robin (so load changes hit all alike); seconds per call, one
    entry per round. ``alternate``: every other round runs them in reverse order (ABBA...), so
    no function always runs right after the same one. ``clock``: wall time by default;
    ``time.process_time`` counts this process's CPU time only (a CPU shared with other jobs)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(iters):
        order = list(fns.items())
        for k, f in order[::-1] if alternate and r % 2 else order:
            sync(device)
            t0 = clock()
            f()
            sync(device)
            out[k].append(clock() - t0)
    return out


# --- the benchmark ---------------------------------------------------------------------------


def run_benchmark(args) -> dict:
    from kava.data.sequences import to_device
    from kava.distill import Objective
    from kava.evaluation.decode import greedy, kv_bytes_per_token, prefill

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, model, encoded, device, amp = build(args)
    objective = Objective(model, cfg).train()
    b = cfg.train.batch_size
    encs = [encoded[i % len(encoded)] for i in range(b)]
    at_step = (
        10**9 if cfg.curriculum.enabled else 0
    )  # the last curriculum stage: all latents, no CoT left in the student
    batch = objective.make_batch(encs, at_step)
    tb, sb = to_device(batch["teacher"], device), to_device(batch["student"], device)
    m, lat = sb["num_latents"], cfg.latent
    dev_batch = {**batch, "teacher": tb, "student": sb}
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else nullcontext
    params = [p for p in objective.parameters() if p.requires_grad]

    def zero():
        for p in params:
            p.grad = None

    def step_cot(backward=True):
        with autocast():
            loss = objective.ce_loss(tb)
        if backward:
            loss.backward()
            zero()

    def step_passes(backward=True):
        # The step's own passes: the teacher pass when the step runs it (with a graph only when
        # Objective.teacher_needs_graph()), the student's passes; CE losses only.
        with autocast():
            teacher = objective.teacher_pass(tb, for_targets=False) if objective.runs_teacher() else None
            student = objective.student_pass(sb)
            loss = student.ce + (teacher.ce if teacher is not None and objective.teacher_needs_graph() else 0.0)
        if backward:
            loss.backward()
            zero()

    def step_teacher(backward=True):
        # (b)'s teacher part alone: the teacher pass as the step runs it, backward only through its CE.
        with autocast():
            teacher = objective.teacher_pass(tb, for_targets=False)
        if backward and objective.teacher_needs_graph():
            teacher.ce.backward()
            zero()

    def step_kava(backward=True):
        with autocast():
            loss, _ = objective(dev_batch)
        if backward:
            loss.backward()
            zero()

    def step_kava_teacher_graph(backward=True):
        """(c) as it ran before the teacher went graph-free: its pass always kept a graph."""
        objective.teacher_needs_graph = lambda: True
        try:
            step_kava(backward)
        finally:
            del objective.teacher_needs_graph

    # Inputs of the selection and of the loss terms, computed once, as the step computes them.
    with torch.no_grad(), autocast():
        t_out = (
            objective.teacher_pass(tb, for_targets=objective.source.needs_teacher_pass)
            if objective.runs_teacher()
            else None
        )
        states = objective.student_states(sb, objective.student_pass(sb))
        request = objective.request(
            tb, t_out, batch.get("external"), batch.get("sequence_stage"), m, batch.get("source_ids")
        )
        targets = objective.source.targets(request)
    leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
    student = type(states)(leaf(states.keys), leaf(states.values), leaf(states.hidden), states.producers.detach())
    leaves = [t for t in (student.keys, student.values, student.hidden) if t is not None]

    def selection():
        # The own pass's cache compressed to M slots (the run's selector, at the sequence stage).
        with torch.no_grad(), autocast():
            request.compress(t_out, tb)

    def loss_terms():
        with autocast():
            terms = objective.source.compare(targets, student, cfg.loss)
            total = cfg.loss.alpha_codi * terms.codi
            if terms.kv is not None:
                total = total + cfg.loss.alpha_kv * terms.kv
        total.backward()
        for t in leaves:
            t.grad = None
        zero()

    # (c) with train.shared_prefix the other way round (the question encoded once / in each mode).
    shared = cfg.train.shared_prefix
    cfg.train.shared_prefix = not shared
    try:
        flipped = objective.make_batch(encs, at_step)
    finally:
        cfg.train.shared_prefix = shared
    flipped = {
        **flipped,
        "teacher": to_device(flipped["teacher"], device),
        "student": to_device(flipped["student"], device),
    }
    flip_name = "kava_unshared" if shared else "kava_shared"

    def step_kava_flipped(backward=True):
        with autocast():
            loss, _ = objective(flipped)
        if backward:
            loss.backward()
            zero()

    fns = {"cot": step_cot, "passes": step_passes, "kava": step_kava}
    if objective.runs_teacher():
        fns["teacher"] = step_teacher
    if "question_len" in flipped["teacher"] or "question_len" in tb:  # (the step runs a teacher pass)
        fns[flip_name] = step_kava_flipped
    graph_free = not objective.teacher_needs_graph()
    if graph_free:
        fns["kava_teacher_graph"] = step_kava_teacher_graph
    if request.compress is not None and objective.source.needs_teacher_pass:
        fns["selection"] = selection
    fns["losses"] = loss_terms
    times = interleaved_times(fns, args.warmup, args.iters, device)
    med = {k: statistics.median(v) for k, v in times.items()}

    positions_per_step = {}
    for name, fn in (("cot", step_cot), ("passes", step_passes), ("kava", step_kava)):
        with count_positions(model) as box:
            fn()
        positions_per_step[name] = box
    memory = {
        name: peak_memory(fn, device, model)
        for name, fn in (("cot", step_cot), ("passes", step_passes), ("kava", step_kava))
    }

    teacher_tokens = int(tb["attention_mask"].sum())
    n_flop_params = sum(p.numel() for n, p in model.base_model.named_parameters() if "embed_tokens" not in n)
    if model.lm_head.weight is model.base_model.get_input_embeddings().weight:
        n_flop_params += model.lm_head.weight.numel()
    if args.peak_tflops > 0:
        peak, peak_source = bf16_peak("", args.peak_tflops)
    elif device.type == "cuda" and amp is torch.bfloat16:
        peak, peak_source = bf16_peak(torch.cuda.get_device_name())
    else:
        peak, peak_source = None, "MFU is against a bf16 peak: needs bf16 on a GPU, or --peak-tflops"
    train = {}
    for name in ("cot", "passes", "kava"):
        t = med[name]
        pos = positions_per_step[name]["positions"]
        flops = 6 * n_flop_params * pos
        train[name] = {
            "step_s": t,
            "step_s_min": min(times[name]),
            "passes": positions_per_step[name]["passes"],
            "positions": pos,
            "teacher_tokens_per_s": teacher_tokens / t,
            "examples_per_s": b / t,
            "model_tflops_per_s": flops / t / 1e12,
            "mfu": None if peak is None else flops / t / peak,
            **memory[name],
        }
    sel_s = med.get("selection", 0.0)
    summary = {
        "kava_over_passes": med["kava"] / med["passes"] - 1.0,
        "selection_s": sel_s,
        "losses_s": med["losses"],
        "selection_losses_share": (sel_s + med["losses"]) / med["kava"],
        "other_overhead_s": med["kava"] - med["passes"] - sel_s - med["losses"],
        # Each phase's share of (c): the teacher pass, the student's passes ((b) less the teacher),
        # selection, the loss terms, and what is left (hooks, gathering, metrics).
        "phase_shares": {
            "teacher pass": med.get("teacher", 0.0) / med["kava"],
            "student passes": (med["passes"] - med.get("teacher", 0.0)) / med["kava"],
            "selection": sel_s / med["kava"],
            "losses": med["losses"] / med["kava"],
            "other": (med["kava"] - med["passes"] - sel_s - med["losses"]) / med["kava"],
        },
        # loss.teacher_ce = 0: the full step with the teacher's graph kept (as before it was dropped), over (c).
        "teacher_graph_over_kava": med["kava_teacher_graph"] / med["kava"] - 1.0 if graph_free else None,
        # train.shared_prefix: the step with the question encoded once over the step encoding it in each mode.
        "shared_prefix": shared,
        "shared_over_unshared": None
        if flip_name not in med
        else (med["kava"] / med[flip_name] if shared else med[flip_name] / med["kava"]),
    }

    # --- inference: latent vs CoT decoding, with evaluation's own decoding ---
    model.eval()
    bpt = kv_bytes_per_token(model)

    def decoding(encs):
        """Latent and CoT decoding of one batch: passes, positions, median wall time, KV cache."""
        n = len(encs)
        n_ans = max(len(e.answer) for e in encs)
        n_cot = max(sum(map(len, e.steps)) + len(e.answer_prefix) + len(e.answer) for e in encs)

        def decode(mode, n_new):
            with autocast():
                p = prefill(model, encs, mode, cfg)
                g = greedy(model, p.cache, p.mask, p.last_h, n_new, p.passes, stop_at_eos=False)
            return g.passes[0], sum(g.kv_tokens) / len(g.kv_tokens)

        def latent_decode():
            return decode("student", n_ans)

        def cot_decode():
            return decode("cot", n_cot)

        with count_positions(model) as lat_box:
            lat_passes, lat_kv = latent_decode()
        with count_positions(model) as cot_box:
            cot_passes, cot_kv = cot_decode()
        dtimes = interleaved_times({"latent": latent_decode, "cot": cot_decode}, args.warmup, args.iters, device)
        t_lat, t_cot = statistics.median(dtimes["latent"]), statistics.median(dtimes["cot"])
        ratio = cot_passes / lat_passes
        return {
            "batch": n,
            "latent": {
                "passes": lat_passes,
                "positions_per_example": lat_box["positions"] / n,
                "wall_s": t_lat,
                "kv_cache_bytes_per_example": lat_kv * bpt,
            },
            "cot": {
                "passes": cot_passes,
                "positions_per_example": cot_box["positions"] / n,
                "wall_s": t_cot,
                "kv_cache_bytes_per_example": cot_kv * bpt,
            },
            "pass_ratio": ratio,
            "position_ratio": cot_box["positions"] / lat_box["positions"],
            "speedup": t_cot / t_lat,
            "speedup_over_pass_ratio": (t_cot / t_lat) / ratio,
        }

    inference = decoding(encs)  # the training batch
    # --decode-batches: the same decoding at other batch sizes (the examples repeated as needed).
    inference_by_batch = {
        str(n): inference if n == b else decoding([encoded[i % len(encoded)] for i in range(n)])
        for n in args.decode_batches
    }

    largest, batch_search = None, None
    if args.find_batch or (device.type == "cuda" and not args.no_find_batch):
        from kava.training.batch_finder import find_largest_batch, training_step_fn

        step = training_step_fn(objective, encoded, at_step=at_step)

        def run(bs):
            with autocast():
                step(bs)

        found = find_largest_batch(run, start=b, max_batch=args.max_batch)
        largest = found.largest
        # hit_limit: every size up to --max-batch fitted, so the true limit is higher.
        batch_search = {
            "largest": found.largest,
            "hit_limit": found.hit_limit,
            "max_batch": args.max_batch,
            "tried": found.tried,
        }

    targets = {
        "kava_within_10pct_of_passes": summary["kava_over_passes"] <= 0.10,
        "selection_losses_at_most_3pct": summary["selection_losses_share"] <= 0.03,
        "latent_speedup_at_least_80pct_of_pass_ratio": inference["speedup_over_pass_ratio"] >= 0.80,
    }
    c = model.base_model.config
    return {
        "machine": machine(device),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
        "model": {
            "name": args.model,
            "layers": c.num_hidden_layers,
            "hidden": c.hidden_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "params": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params),
            "adapter": cfg.model.adapter,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "autocast": str(amp).removeprefix("torch.") if amp else "no",
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
        },
        "batch": {
            "size": b,
            "teacher_len": int(tb["input_ids"].shape[1]),
            "teacher_tokens": teacher_tokens,
            "prefix_len": int(sb["prefix_ids"].shape[1]),
            "suffix_len": int(sb["suffix_ids"].shape[1]),
            "latents": m,
            "scheme": lat.scheme,
            "iterations": lat.iterations,
            "selector": cfg.loss.compression,
        },
        "iters": args.iters,
        "train": train,
        "summary": summary,
        "inference": inference,
        "inference_by_batch": inference_by_batch,
        "peak_flops": peak,
        "peak_source": peak_source,
        "largest_batch": largest,
        "batch_search": batch_search,
        "targets": targets,
    }


def machine(device) -> dict:
    out = {
        "device": device.type,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    try:
        out["load_average"] = os.getloadavg()
    except OSError:
        pass
    return out


def report(r: dict) -> str:
    ms = lambda s: f"{s * 1e3:8.1f} ms"  # noqa: E731
    mb = lambda x: f"{x / 2**20:7.1f} MiB"  # noqa: E731
    lines = [
        f"model {r['model']}",
        f"batch {r['batch']}",
        f"machine {r['machine']}",
        "",
        "training step (median of %d)" % r["iters"],
    ]
    for name, label in (
        ("cot", "(a) CoT fine-tuning step"),
        ("passes", "(b) unavoidable KaVa passes"),
        ("kava", "(c) full KaVa step"),
    ):
        t = r["train"][name]
        mem = (
            f"peak {mb(t['peak_bytes'])}"
            if "peak_bytes" in t
            else f"saved activations {mb(t['saved_activation_bytes'])}"
        )
        mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] is not None else ""
        lines.append(
            f"  {label:<30}{ms(t['step_s'])}  {t['passes']:3d} passes  {t['teacher_tokens_per_s']:9.0f} teacher tok/s  "
            f"{mem}{mfu}"
        )
    s = r["summary"]
    lines += [
        f"  (c) over (b): {s['kava_over_passes']:+.1%}   selection {ms(s['selection_s'])}   losses {ms(s['losses_s'])} "
        "  "
        f"selection+losses share of (c): {s['selection_losses_share']:.1%}   "
        f"other overhead {ms(s['other_overhead_s'])}",
    ]
    lines.append("  share of (c): " + ", ".join(f"{k} {v:.1%}" for k, v in s["phase_shares"].items()))
    if s.get("teacher_graph_over_kava") is not None:
        lines.append(
            "  (c) with the teacher's graph kept (teacher_ce = 0, the old behaviour): "
            f"{s['teacher_graph_over_kava']:+.1%} over (c)"
        )
    if s.get("shared_over_unshared") is not None:
        way = "with" if s["shared_prefix"] else "without"
        lines.append(
            f"  train.shared_prefix (the question encoded once, this run's (c) {way} it): "
            f"step time shared / unshared {s['shared_over_unshared']:.3f}"
        )
    lines += ["", "decoding (same batch, greedy with the KV cache)"]
    i = r["inference"]
    for name in ("latent", "cot"):
        d = i[name]
        lines.append(
            f"  {name:<7}{d['passes']:4d} passes  {d['positions_per_example']:6.1f} positions/example  "
            f"{ms(d['wall_s'])}  "
            f"KV cache {d['kv_cache_bytes_per_example'] / 1024:8.1f} KiB/example"
        )
    lines.append(
        f"  pass ratio {i['pass_ratio']:.2f}x (positions ratio {i['position_ratio']:.2f}x), wall-time speed-up "
        f"{i['speedup']:.2f}x "
        f"= {i['speedup_over_pass_ratio']:.0%} of the pass ratio"
    )
    for n, d in r["inference_by_batch"].items():
        lines.append(
            f"  batch {n:>4}: latent {ms(d['latent']['wall_s'])}, CoT {ms(d['cot']['wall_s'])}, speed-up "
            f"{d['speedup']:.2f}x "
            f"(pass ratio {d['pass_ratio']:.2f}x)"
        )
    lines.append(
        f"MFU peak: {'%.0f TFLOP/s' % (r['peak_flops'] / 1e12) if r['peak_flops'] else 'none'} ({r['peak_source']})"
    )
    if r["batch_search"] is not None:
        bs = r["batch_search"]
        note = f" (every size up to --max-batch {bs['max_batch']} fitted)" if bs["hit_limit"] else ""
        lines.append(f"largest batch that fits: {bs['largest']}{note}; tried {bs['tried']}")
    lines += ["", "targets: " + ", ".join(f"{k} {'MET' if v else 'MISSED'}" for k, v in r["targets"].items())]
    return "\n".join(lines)


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give batch sizes as N,N,...") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: batch sizes must be >= 1")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=("tiny", "llama-1b"),
        default="tiny",
        help="tiny: the config's model; llama-1b: Llama-3.2-1B shape, random weights",
    )
    p.add_argument(
        "--config",
        help="config file (default: configs/curriculum/kava.yaml, or configs/paper/llama1b_aug.yaml for llama-1b)",
    )
    p.add_argument("--batch", type=int, default=0, help="batch size (default: the config's train.batch_size)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--layers", type=int, default=0, help="llama-1b: fewer layers (a quick smoke run)")
    p.add_argument("--question-tokens", type=int, default=96, help="llama-1b: question length (GSM8k-like)")
    p.add_argument("--cot-steps", type=int, default=4, help="llama-1b: CoT steps")
    p.add_argument("--step-tokens", type=int, default=14, help="llama-1b: tokens per CoT step")
    p.add_argument("--answer-tokens", type=int, default=3, help="llama-1b: answer tokens including <eos>")
    p.add_argument("--no-find-batch", action="store_true", help="GPU: skip the largest-batch search")
    p.add_argument(
        "--find-batch",
        action="store_true",
        help="run the largest-batch search on a CPU too (there --max-batch is the limit)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=512,
        help="largest batch the search tries (doubling from the batch, then bisecting)",
    )
    p.add_argument(
        "--decode-batches",
        type=_sizes,
        default=[],
        metavar="N,N",
        help="also time latent vs CoT decoding at these batch sizes, e.g. 1,64",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=os.environ.get("KAVA_PEAK_TFLOPS", "0"),
        help="bf16 peak of the device in TFLOP/s for MFU (default: env KAVA_PEAK_TFLOPS, else the table by GPU name)",
    )
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    r = run_benchmark(args)
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()

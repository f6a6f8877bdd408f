"""kava's training step against ports of its peers' steps, per example, timed side by side.

Three steps run on the same Hugging Face backbone (a Llama built in code with random weights:
``--model tiny`` is the testbed's, ``--model medium`` 12 layers, d = 512, a 32k vocabulary), on
the same batch of examples with the same token ids and lengths (``Q``: question, ``C``: chain of
thought, ``A``: answer prefix + answer; built by kava's batch builders, no padding), one after
another in one process (rounds ABC CBA ..., one torch thread by default):

  kava   ``kava.distill.Objective`` on ``--config`` (default configs/tiny/kava.yaml, the paper's
         recipe on the testbed: Jacobi latents, CODI loss, teacher CE, R-KV KV loss), with
         ``latent.num_latents = M``, ``latent.iterations = T``, no curriculum and no dropped CoT step
  codi   official CODI's step (github.com/zhenyi4/codi, ``src/model.py`` ``CODI.forward`` and the
         batches of ``train.py``), ported onto the backbone
  pccot  PCCoT's step (github.com/whyNLP/PCCoT, ``models/modeling_llama.py``
         ``PCCoTLlamaForCausalLM.forward`` and ``models/data_processor.py``), ported likewise

Optional arms (``--arms``): ``kava_codi``, kava's objective with CODI's recipe (sequential
latents, no KV loss: the same maths as ``codi``), and ``codi_1pass``, the CODI port with one
teacher pass (its graph's hidden states, detached, as the targets). Each step is forward +
backward (gradients dropped after each); no optimizer step, no data loading. Reported: median
ms per example of every arm, and for every kava arm over every peer the median over rounds of
the per-round ratio (kava / peer, the same examples) with a 95% bootstrap interval.

What the CODI port keeps (``codi_step``):
  - the student: one pass over ``Q <bot>`` with its attention mask, then M passes of one latent
    each, the last layer's hidden state at the last position through the projection
    (Linear-GELU-Linear-LayerNorm, CODI's ``prj`` with ``prj_dim = d``, here kava's projection
    module, the same layers), the M-th latent's projection computed and not fed, then one pass
    over ``<eot> A``: M + 2 passes from one KV cache; no mask after the first pass
    (``fix_attn_mask=False``, CODI's default);
  - the teacher: two passes over ``Q C A``, one under ``no_grad`` whose hidden states are the
    targets and one with a graph for the teacher's CE (``ref_outputs`` / ``ref_outputs_with_grad``),
    without an attention mask, each building the KV cache the model builds by default;
  - every pass calls the causal LM, so the LM head runs over every position of every pass,
    including the question pass and the latent passes whose logits nothing reads;
  - the CE of ``logits[:, :-1]`` against the next tokens on the student's ``<eot> A`` and on
    the teacher's ``C A`` (question masked);
  - the distillation at the token before the answer, for every hidden state the model returns
    (the embedding output and the L layers): smooth L1 (``distill_loss_type``'s default) divided
    by the std of the teacher's states (``distill_loss_div_std``), averaged over the L + 1 entries;
  - the weights of the Llama-1B GSM8k-Aug script: ``loss = CE_student + 20 * distill + CE_teacher``.
  Left out: the script's ``print_ref_model_stats`` (a softmax over the whole teacher logits and
  a print every step) and the trainer's ``.item()`` logging, both of which only make CODI
  slower; CODI's tokenization (the token ids and positions come from kava's batches, the same
  spans: the answer position CODI finds by searching "The answer is:" is kava's ``distill_pos``;
  its Llama +1 / -1 cancel); LoRA, bf16 and the optimizer, which follow this benchmark's
  settings for every arm alike.

What the PCCoT port keeps (``pccot_step``):
  - the teacher: one pass with a graph over ``Q C A`` with its mask and hidden states (and the
    KV cache the model builds by default, never read), the LM head over every position, logits
    cast to float32, CE of ``logits[:, :-1]`` on ``C A``;
  - the student: one pass over ``Q <bot>`` and M placeholder tokens; the states at ``<bot>``
    and the first M - 1 placeholders are the first latents; the cache cropped to ``Q <bot>``;
    T iterations, each over the M latents from a copy of that cache, the next latents being the
    first latent (kept) and the iteration's outputs but the last; one answer pass over ``<eot> A``
    from the last iteration's cache with the full mask and hidden states, the LM head over every
    position in float32, CE of ``logits[:, :-1]``: T + 2 passes;
  - no projection (``use_projection=False``, the default of their configuration class, which
    their configs and scripts keep);
  - the distillation: the teacher's and the student's hidden states of the L layers (not the
    embedding output) stacked over all positions, then taken at the last answer-prompt token,
    smooth L1 divided per layer by the teacher's std (``use_layerwise_std``, their default),
    mean; ``loss = CE_teacher + CE_student + KD`` (``loss_alpha = loss_beta = loss_gamma = 1``).
  Left out: the four ``.item()`` calls that log the losses every step; the placeholder is
  kava's ``<bot>`` (PCCoT adds a ``<latent>`` token: another row of the same embedding); the
  flash-attention and liger kernels their GPU script asks for are the backbone's attention
  implementation here, as for every arm.

On a CPU a pass costs about in proportion to the positions it feeds, so the positions fed per
example and the passes of each arm are printed too (kava's Jacobi: ``P + (T + 1) M + S``
positions in T + 1 passes; CODI: ``P + M + S`` in M + 2; PCCoT: ``P + (T + 1) M + S`` in T + 2).

  python benchmarks/bench_peers.py --quick                 # one small shape, under a minute
  python benchmarks/bench_peers.py --model medium --shapes 16x12x6,16x60x6
  python benchmarks/bench_peers.py                         # the tiny model, B 16/64 x C 12/60 x M 6/24, T 3
  python benchmarks/bench_peers.py --quick --profile 8       # and where each arm's step spends its time
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import count_positions, interleaved_times, machine, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("kava", "kava_codi", "codi", "codi_1pass", "pccot")
CODI_DISTILL_FACTOR = 20.0  # distill_loss_factor of CODI's Llama-1B GSM8k-Aug script


@dataclass(frozen=True)
class Backbone:
    """A Llama decoder built in code (``vocab = 0``: the tokenizer's size)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 0
    tied: bool = False


MODELS = {
    "tiny": Backbone(4, 128, 4, 2, 256),  # configs/tiny/base.yaml's model
    "medium": Backbone(12, 512, 8, 4, 2048, vocab=32000, tied=True),  # 63.6 M parameters
}


@dataclass(frozen=True)
class Shape:
    batch: int
    cot: int  # CoT tokens of every example
    latents: int  # M
    iterations: int = 3  # T (Jacobi: kava and PCCoT)

    def label(self) -> str:
        return f"{self.batch}x{self.cot}x{self.latents}x{self.iterations}"


GRID = tuple(Shape(b, c, m) for b in (16, 64) for c in (12, 60) for m in (6, 24))
QUICK = Shape(16, 12, 6)


# --- setup ------------------------------------------------------------------------------------


def kava_config(path: str, shape: Shape, overrides=(), arm: str = "kava"):
    """The kava arm's config: ``path`` with the shape's batch, M and T, no curriculum, no dropped
    CoT step (every arm sees the same C tokens), then ``overrides``. ``arm="kava_codi"``: CODI's
    recipe in kava (sequential latents, no KV loss)."""
    from kava.config import load_config

    fixed = [
        "model.name_or_path=tiny",
        "model.init_from=",
        "train.mode=kava",
        "curriculum.enabled=false",
        "loss.drop_last_step=false",
        f"train.batch_size={shape.batch}",
        f"latent.num_latents={shape.latents}",
        f"latent.iterations={shape.iterations}",
    ]
    codi = ["latent.scheme=sequential", "loss.alpha_kv=0"] if arm == "kava_codi" else []
    return load_config(path, [*fixed, *overrides, *codi])


def build_model(cfg, spec: Backbone, device: torch.device, dtype: torch.dtype):
    """A :class:`kava.model.KavaModel` around a ``LlamaForCausalLM`` of ``spec`` (random weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kava.model import wrap_backbone
    from kava.model.tokenizer import build_synthetic_tokenizer

    tok = build_synthetic_tokenizer()
    lc = LlamaConfig(
        vocab_size=spec.vocab or len(tok),
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        intermediate_size=spec.intermediate,
        tie_word_embeddings=spec.tied,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    lc._attn_implementation = cfg.model.attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        backbone = LlamaForCausalLM(lc).to(dtype)
    return wrap_backbone(cfg, tok, backbone, base_reloadable=False).to(device)  # (the projection stays float32)


def make_examples(model, cfg, n: int, question: int, cot: int, step_tokens: int, answer: int, seed: int = 0):
    """``n`` examples of random tokens, all of the same lengths: ``question`` tokens, ``cot``
    tokens in steps of ``step_tokens``, the config's answer prefix, ``answer`` tokens (the last
    one ``<eos>``)."""
    from kava.data.sequences import Encoded, TextEncoder

    tok = model.tokenizer
    prefix = list(TextEncoder(tok, cfg.data).answer_prefix_ids)
    g = torch.Generator().manual_seed(seed)
    lo, hi = 10, min(len(tok) - 4, 60)

    def rand(k: int) -> list[int]:
        return torch.randint(lo, hi, (k,), generator=g).tolist()

    out = []
    for _ in range(n):
        ids = rand(cot)
        steps = [ids[i : i + step_tokens] for i in range(0, cot, step_tokens)]
        out.append(Encoded(rand(question), steps, prefix, rand(answer - 1) + [tok.eos_token_id], [-100] * len(steps)))
    return out


# --- the ports ---------------------------------------------------------------------------------


@dataclass
class PeerLoss:
    loss: torch.Tensor  # what the peer back-propagates
    ce_student: torch.Tensor
    ce_teacher: torch.Tensor
    distill: torch.Tensor  # the hidden-state term, before its weight


def _cache_kw() -> str:
    from kava.model.backbone import _CACHE_KW

    return _CACHE_KW


def _causal_lm(model, cache=None, **inputs):
    """One call of the causal LM as CODI makes it (``self.codi(...)``): the decoder and the LM
    head over every position; positions from the cache length, HF's cache default."""
    if cache is not None:
        inputs[_cache_kw()] = cache
    return model.base_model(**inputs)


def _decoder(model, cache=None, **inputs):
    """One call of the decoder alone, as PCCoT makes it (``self.model(...)``)."""
    if cache is not None:
        inputs[_cache_kw()] = cache
    return model.decoder(**inputs)


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Both peers' CE: ``logits[:, :-1]`` against the next tokens. kava's labels are already
    aligned (label ``i`` is token ``i + 1``, -100 where nothing is predicted), so the peers'
    ``labels[:, 1:]`` is kava's ``labels[:, :-1]``."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1), ignore_index=-100)


def codi_distill(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "smooth_l1") -> torch.Tensor:
    """CODI's distillation term. ``student[j]``, ``teacher[j]``: ``[B, D]``, hidden state ``j`` at
    the token before the answer. Per entry the element loss (``smooth_l1``, CODI's default, or
    ``l2``) averaged over batch and dims, divided by the std of the teacher's entry (``l2``:
    twice, as CODI does), then averaged over the entries."""
    if kind not in ("smooth_l1", "l2"):
        raise ValueError(f"kind: {kind!r} is not smooth_l1 or l2")
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        t = t.detach()
        term = F.smooth_l1_loss(s, t) if kind == "smooth_l1" else F.mse_loss(s, t)
        std = t.std()
        term = term / std / std if kind == "l2" else term / std
        total = total + term
    return total / len(student)


def codi_step(
    model, tb: dict, sb: dict, num_latents: int, teacher_passes: int = 2, distill_factor: float = CODI_DISTILL_FACTOR
) -> PeerLoss:
    """Official CODI's loss on kava's batches (``tb``: :func:`kava.data.sequences.teacher_batch`,
    ``sb``: :func:`kava.data.sequences.student_batch`), see the module docstring.
    ``teacher_passes=1``: the teacher's graph pass also gives the (detached) targets."""
    from transformers import DynamicCache

    if teacher_passes not in (1, 2):
        raise ValueError(f"teacher_passes: {teacher_passes} is not 1 or 2")
    rows = torch.arange(sb["prefix_ids"].shape[0], device=sb["prefix_ids"].device)
    cache = DynamicCache()
    out = _causal_lm(
        model,
        cache,
        input_ids=sb["prefix_ids"],
        attention_mask=sb["prefix_mask"].long(),
        use_cache=True,
        output_hidden_states=True,
    )
    latent = model.project(out.hidden_states[-1][:, -1:])
    ref = None
    if teacher_passes == 2:
        with torch.no_grad():
            ref = _causal_lm(model, input_ids=tb["input_ids"], output_hidden_states=True)
    ref_grad = _causal_lm(model, input_ids=tb["input_ids"], output_hidden_states=True)
    ref = ref_grad if ref is None else ref
    for _ in range(num_latents):
        out = _causal_lm(model, cache, inputs_embeds=latent, use_cache=True, output_hidden_states=True)
        latent = model.project(out.hidden_states[-1][:, -1:])  # the M-th is not fed, as in CODI
    dec = _causal_lm(
        model, cache, inputs_embeds=model.embed(sb["suffix_ids"]), use_cache=True, output_hidden_states=True
    )
    s_at, t_at = sb["distill_idx"], tb["distill_pos"]
    distill = codi_distill([h[rows, s_at] for h in dec.hidden_states], [h[rows, t_at] for h in ref.hidden_states])
    ce = shifted_ce(dec.logits, sb["suffix_labels"])
    ref_ce = shifted_ce(ref_grad.logits, tb["labels"])
    return PeerLoss(ce + distill_factor * distill + ref_ce, ce, ref_ce, distill)


def pccot_kd(student: torch.Tensor, teacher: torch.Tensor, layerwise_std: bool = True) -> torch.Tensor:
    """PCCoT's distillation term. ``student``, ``teacher``: ``[L, B, D]`` (one entry per layer).
    Smooth L1, divided by the teacher's std of each layer (``layerwise_std``) or of all layers."""
    teacher = teacher.detach()
    if not layerwise_std:
        return F.smooth_l1_loss(student, teacher) / teacher.std()
    n = teacher.shape[0]
    per = F.smooth_l1_loss(student, teacher, reduction="none").reshape(n, -1)
    return (per / teacher.reshape(n, -1).std(-1, keepdim=True)).mean()


def pccot_step(
    model, tb: dict, sb: dict, num_latents: int, iterations: int, placeholder_id: int | None = None
) -> PeerLoss:
    """PCCoT's loss on kava's batches, see the module docstring. ``placeholder_id``: the token of
    the M placeholders of the first student pass (default ``<bot>``)."""
    from transformers import DynamicCache

    from kava.model.latent import PrefixCache, crop_cache

    # Part 1: the teacher, with a graph.
    out = _decoder(
        model, input_ids=tb["input_ids"], attention_mask=tb["attention_mask"].long(), output_hidden_states=True
    )
    cot_loss = shifted_ce(model.lm_head(out.last_hidden_state).float(), tb["labels"])
    # Part 2: the student; the first pass reads Q <bot> and M placeholders.
    ids, mask = sb["prefix_ids"], sb["prefix_mask"]
    b, p = ids.shape
    m = num_latents
    fill = model.bot_id if placeholder_id is None else placeholder_id
    full = torch.cat([ids, torch.full((b, m), fill, dtype=ids.dtype, device=ids.device)], 1)
    full_mask = torch.cat([mask, mask.new_ones(b, m)], 1)
    cache = DynamicCache()
    first = _decoder(model, cache, input_ids=full, attention_mask=full_mask.long())
    latents = first.last_hidden_state[:, p - 1 : p + m - 1]  # (no projection)
    crop_cache(cache, p)  # (PCCoT: cache.crop)
    question = PrefixCache(cache, mask, first.last_hidden_state[:, :p])
    for _ in range(iterations):
        step_cache = question.fork()
        h = _decoder(model, step_cache, inputs_embeds=latents).last_hidden_state
        latents = torch.cat([latents[:, :1], h[:, :-1]], 1)
    answer = _decoder(
        model,
        step_cache,
        input_ids=sb["suffix_ids"],
        attention_mask=torch.cat([full_mask, sb["suffix_mask"]], 1).long(),
        output_hidden_states=True,
    )
    ccot_loss = shifted_ce(model.lm_head(answer.last_hidden_state).float(), sb["suffix_labels"])
    # Part 3: distillation at the last answer-prompt token, layers 1..L.
    n_layers, d = len(out.hidden_states) - 1, out.last_hidden_state.shape[-1]
    teacher = torch.stack(out.hidden_states, 1).detach()[:, 1:]  # [B, L, N, D]
    teacher = teacher.gather(2, tb["distill_pos"][:, None, None, None].expand(-1, n_layers, 1, d))
    student = torch.stack(answer.hidden_states, 1)[:, 1:]
    student = student.gather(2, sb["distill_idx"][:, None, None, None].expand(-1, n_layers, 1, d))
    kd = pccot_kd(student.transpose(0, 1).squeeze(2), teacher.transpose(0, 1).squeeze(2))
    return PeerLoss(cot_loss + ccot_loss + kd, ccot_loss, cot_loss, kd)


# --- timing ------------------------------------------------------------------------------------


def median_ratio(
    num: list[float], den: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """The median over rounds of ``num[i] / den[i]`` and a percentile-bootstrap interval for it
    (rounds resampled with replacement): ``(median, low, high)``."""
    if len(num) != len(den) or not num:
        raise ValueError("need one time of each arm per round, and at least one round")
    ratios = [a / b for a, b in zip(num, den)]
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    tail = (1.0 - level) / 2
    lo = meds[int(tail * (resamples - 1))]
    hi = meds[int(round((1.0 - tail) * (resamples - 1)))]
    return statistics.median(ratios), lo, hi


def step_functions(model, cfg_path: str, shape: Shape, encs, device, arms, overrides=()) -> dict:
    """One callable per arm, each a forward + backward of that arm's loss on the same examples."""
    from kava.data.sequences import to_device
    from kava.distill import Objective

    objectives = {
        a: Objective(model, kava_config(cfg_path, shape, overrides, a)).train() for a in arms if a.startswith("kava")
    }
    any_cfg = kava_config(cfg_path, shape, overrides)
    probe = next(iter(objectives.values()), None) or Objective(model, any_cfg).train()
    batch = probe.make_batch(
        encs, 0
    )  # the same sequences for every arm (kava_codi's differ in nothing the batch holds)
    tb, sb = to_device(batch["teacher"], device), to_device(batch["student"], device)
    dev_batch = {**batch, "teacher": tb, "student": sb}
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    for o in objectives.values():
        params.update({id(p): p for p in o.parameters() if p.requires_grad})
    m, t = shape.latents, shape.iterations

    def run(loss_fn):
        def step():
            loss_fn().backward()
            for p in params.values():
                p.grad = None

        return step

    fns = {}
    for a in arms:
        if a in objectives:
            fns[a] = run(lambda o=objectives[a]: o(dev_batch)[0])
        elif a == "codi":
            fns[a] = run(lambda: codi_step(model, tb, sb, m).loss)
        elif a == "codi_1pass":
            fns[a] = run(lambda: codi_step(model, tb, sb, m, teacher_passes=1).loss)
        elif a == "pccot":
            fns[a] = run(lambda: pccot_step(model, tb, sb, m, t).loss)
        else:
            raise ValueError(f"unknown arm {a!r}; choose from {', '.join(ARMS)}")
    return fns


def time_shape(model, shape: Shape, args, device) -> dict:
    """Every arm of ``args.arms`` on one shape: positions and passes, then the interleaved rounds."""
    encs = make_examples(
        model,
        kava_config(args.config, shape, args.overrides),
        shape.batch,
        args.question_tokens,
        shape.cot,
        args.step_tokens,
        args.answer_tokens,
    )
    fns = step_functions(model, args.config, shape, encs, device, args.arms, args.overrides)
    arms = {}
    for name, fn in fns.items():
        with count_positions(model) as box:
            fn()
        arms[name] = {"passes": box["passes"], "positions_per_example": box["positions"] / shape.batch}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_times(fns, args.warmup, args.iters, device, alternate=True, clock=clock)
    for name, ts in times.items():
        arms[name].update(
            ms_per_example=statistics.median(ts) * 1e3 / shape.batch, ms_per_example_min=min(ts) * 1e3 / shape.batch
        )
    ratios = {}
    for k in (a for a in fns if a.startswith("kava")):
        for peer in (a for a in fns if not a.startswith("kava")):
            med, lo, hi = median_ratio(times[k], times[peer], seed=len(ratios))
            ratios[f"{k}/{peer}"] = {"median": med, "low": lo, "high": hi}
    out = {"shape": asdict(shape), "arms": arms, "ratios": ratios, "rounds": args.iters}
    if args.profile:
        out["profile"] = {name: profile_step(fn, args.profile) for name, fn in fns.items()}
    return out


MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")


def profile_step(fn, top: int) -> dict:
    """One step of ``fn`` under ``torch.profiler`` (CPU): its total self CPU time, the share spent
    in matrix products, and the ``top`` operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    mm = sum(e.self_cpu_time_total for e in ops if e.key in MATMULS)
    return {
        "self_cpu_ms": total / 1e3,
        "matmul_share": mm / total if total else 0.0,
        "top": [{"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in ops[:top]],
    }


def table(results: list[dict], model_name: str) -> str:
    """Markdown: ms per example of each arm and the ratios; positions and passes of each arm."""
    arms = list(results[0]["arms"])
    pairs = list(results[0]["ratios"])
    head = ["model", "B", "C", "M", "T", *[f"{a} ms/ex" for a in arms], *pairs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        s = r["shape"]
        cells = [model_name, s["batch"], s["cot"], s["latents"], s["iterations"]]
        cells += [f"{r['arms'][a]['ms_per_example']:.2f}" for a in arms]
        cells += [f"**{q['median']:.2f}** [{q['low']:.2f}, {q['high']:.2f}]" for q in (r["ratios"][p] for p in pairs)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "",
        "| B | C | M | T | " + " | ".join(f"{a} positions/ex (passes)" for a in arms) + " |",
        "|" + "---|" * (4 + len(arms)),
    ]
    for r in results:
        s = r["shape"]
        cells = [s["batch"], s["cot"], s["latents"], s["iterations"]]
        cells += [f"{r['arms'][a]['positions_per_example']:.0f} ({r['arms'][a]['passes']})" for a in arms]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def targets(results: list[dict], model_name: str) -> list[str]:
    """The issue's targets for the shapes measured: kava / CODI <= 0.67 on the medium model at
    B = 16 with M = 6 (CoT 12 and 60), and never above 1.0."""
    out = []
    for r in results:
        q = r["ratios"].get("kava/codi")
        if q is None:
            continue
        s = r["shape"]
        limit = 0.67 if model_name == "medium" and s["batch"] == 16 and s["latents"] == 6 else 1.0
        ok = q["median"] <= limit
        out.append(
            f"kava/codi {model_name} B={s['batch']} C={s['cot']} M={s['latents']}: {q['median']:.2f} "
            f"(target <= {limit:g}: {'met' if ok else 'missed'})"
        )
    return out


def _shapes(text: str) -> list[Shape]:
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        try:
            nums = [int(x) for x in part.strip().split("x")]
        except ValueError:
            nums = []
        if len(nums) not in (3, 4) or min(nums) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: give shapes as BxCxM or BxCxMxT, e.g. 16x12x6")
        out.append(Shape(*nums))
    if not out:
        raise argparse.ArgumentTypeError("no shape given")
    return out


def _arms(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: arms are {', '.join(ARMS)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="tiny",
        help="tiny: 4 layers, d=128; medium: 12 layers, d=512, 32k vocabulary",
    )
    p.add_argument(
        "--config",
        default=str(ROOT / "configs/tiny/kava.yaml"),
        help="kava's recipe (default: the paper's on the testbed)",
    )
    p.add_argument(
        "--shapes",
        type=_shapes,
        default=list(GRID),
        help="BxCxM[xT],... (batch, CoT tokens, latents, iterations; default: B 16/64 x C 12/60 x M 6/24, T 3)",
    )
    p.add_argument(
        "--arms", type=_arms, default=["kava", "codi", "pccot"], help=f"comma-separated, from {', '.join(ARMS)}"
    )
    p.add_argument("--quick", action="store_true", help="the tiny model, one shape (16x12x6), 6 rounds: under a minute")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each runs every arm once)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (CPU only, for a machine shared with other jobs)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="the backbone's (auto: bf16 on a GPU, else fp32)",
    )
    p.add_argument("--question-tokens", type=int, default=32, help="question length of every example")
    p.add_argument("--step-tokens", type=int, default=6, help="CoT tokens per step")
    p.add_argument(
        "--answer-tokens", type=int, default=3, help="answer tokens, <eos> included (after the answer prefix)"
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="after timing a shape, one step of every arm under torch.profiler: self CPU time, "
        "matrix-product share and the N costliest operators",
    )
    p.add_argument("--json", help="also write every figure here")
    p.add_argument(
        "overrides", nargs="*", help="kava config overrides key=value (the backbone's adapter applies to every arm)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.shapes, args.iters, args.warmup = "tiny", [QUICK], 6, 1
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    return args


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu times the host's CPU, not the GPU's work: use --clock wall on a GPU")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(kava_config(args.config, args.shapes[0], args.overrides), MODELS[args.model], device, dtype)
    results = [time_shape(model, shape, args, device) for shape in args.shapes]
    sync(device)
    info = machine(device)
    info.pop("load_average", None)
    return {
        "machine": info,
        "model": {
            "name": args.model,
            **asdict(MODELS[args.model]),
            "params": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."),
        },
        "clock": args.clock,
        "config": Path(args.config).name,
        "overrides": args.overrides,
        "question_tokens": args.question_tokens,
        "answer_tokens": args.answer_tokens,
        "results": results,
    }


def report(r: dict) -> str:
    m, mod = r["machine"], r["model"]
    where = m.get("gpu") or f"{m['cpus']} CPU cores, {m['torch_threads']} torch thread(s)"
    res = r["results"]
    lines = [
        f"kava ({r['config']}{' ' + ' '.join(r['overrides']) if r['overrides'] else ''}) against CODI and PCCoT ports: "
        f"forward + backward, median of {res[0]['rounds']} interleaved rounds, ms per example ({r['clock']} time); "
        f"ratio: median over rounds "
        f"of kava / peer [95% bootstrap interval]",
        f"model {mod['name']}: {mod['layers']} layers, d={mod['hidden']}, {mod['params'] / 1e6:.1f} M parameters, "
        f"{mod['dtype']}; "
        f"question {r['question_tokens']} tokens, answer {r['answer_tokens']}; {where}, torch {m['torch']}",
        "",
        table(res, mod["name"]),
    ]
    t = targets(res, mod["name"])
    if t:
        lines += ["", *t]
    for x in res:
        for arm, prof in x.get("profile", {}).items():
            top = ", ".join(f"{o['op']} {o['self_cpu_ms']:.0f} ms ({o['calls']})" for o in prof["top"])
            lines.append(
                f"profile {Shape(**x['shape']).label()} {arm}: {prof['self_cpu_ms']:.0f} ms self CPU, "
                f"matrix products {prof['matmul_share']:.0%}; top: {top}"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    r = run(args)
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()

"""Evaluation: decode every example in each mode, grade it, summarise, write the predictions.

Every prediction is graded twice (:data:`kava.answers.GRADERS`): ``strict`` (a number right
after an answer marker; the headline ``accuracy``) and ``flexible`` (else the last number;
``accuracy_flexible``). ``truncated`` counts generations that hit the token cap without <eos>.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..answers import GRADERS, is_correct
from ..config import KavaConfig
from ..data.schema import Example
from ..data.sequences import BOT, EOT, TextEncoder
from ..io import atomic_write, atomic_write_json, check_output_folder
from ..model.backbone import KavaModel
from .decode import MODES, generate, graded_text, hit_cap, kv_bytes_per_token
from .results import accuracy_stderr, eval_folder_name, provenance, write_results

log = logging.getLogger("kava.eval")


def grade(text: str, gold: str, marker: str) -> dict[str, bool]:
    """``{grader: correct}`` for every grader; `marker` is the run's answer prefix."""
    return {grader: is_correct(text, gold, grader, marker=marker) for grader in GRADERS}


def prompt_text(model: KavaModel, enc, mode: str, cfg: KavaConfig) -> str:
    """The prompt of one example as the model read it: the question's tokens decoded (any
    BOS and chat template included), then ``<bot>[M latents]<eot>`` and the answer prefix
    (student), the answer prefix (nocot) or nothing (cot)."""
    text = model.tokenizer.decode(enc.question, skip_special_tokens=False)
    if mode == "student":
        text += f"{BOT}[{cfg.latent.num_latents} latents]{EOT}"
    return text + (cfg.data.answer_prefix if mode != "cot" else "")


def summarise(preds: list[dict], wall_time_s: float) -> dict:
    """The metrics of one mode from its prediction rows.

    ``accuracy`` is the strict grader's (the headline), ``accuracy_flexible`` the flexible
    one's, each with its standard error (``accuracy_stderr``, ``accuracy_flexible_stderr``);
    ``truncated`` counts the generations that hit the token cap without <eos> and
    ``truncated_fraction`` is their share. Means are over the ``n`` examples.
    ``by_cot_steps``: ``n`` and both accuracies for the examples of each length of reference
    chain of thought (a difficulty scale: on the synthetic sums of products it is the size).
    """
    n = max(len(preds), 1)
    groups: dict[int, list[dict]] = {}
    for p in preds:
        groups.setdefault(p["cot_steps"], []).append(p)
    by_steps = {
        str(k): {
            "n": len(g),
            "accuracy": sum(p["correct"] for p in g) / len(g),
            "accuracy_flexible": sum(p["correct_flexible"] for p in g) / len(g),
        }
        for k, g in sorted(groups.items())
    }
    strict, flexible = sum(p["correct"] for p in preds), sum(p["correct_flexible"] for p in preds)
    return {
        "n": len(preds),
        "accuracy": strict / n,
        "accuracy_stderr": accuracy_stderr(strict, len(preds)),
        "accuracy_flexible": flexible / n,
        "accuracy_flexible_stderr": accuracy_stderr(flexible, len(preds)),
        "truncated": sum(p["truncated"] for p in preds),
        "truncated_fraction": sum(p["truncated"] for p in preds) / n,
        "forward_passes": sum(p["forward_passes"] for p in preds) / n,
        "generated_tokens": sum(p["generated_tokens"] for p in preds) / n,
        "kv_cache_bytes": sum(p["kv_cache_bytes"] for p in preds) / n,
        "peak_kv_cache_bytes": max((p["kv_cache_bytes"] for p in preds), default=0),
        "wall_time_s": wall_time_s,
        "by_cot_steps": by_steps,
    }


def evaluate(
    model: KavaModel,
    examples: list[Example],
    cfg: KavaConfig,
    modes: tuple[str, ...] | list[str] = ("student",),
    out_dir: str | Path | None = None,
    desc: str = "eval",
) -> dict[str, dict]:
    """Accuracy, mean forward passes, generated tokens, wall time and KV-cache size per mode
    (see :func:`summarise`).

    With ``out_dir``, writes ``predictions_<mode>.jsonl`` (one row per example: the
    ``prompt``, the ``target``, the ``generation``, the graded text (``prediction``), each
    grader's verdict (``verdicts``; ``correct`` is the strict one, ``correct_flexible``),
    ``truncated``, passes, tokens and KV bytes) and ``eval_metrics.json`` there.
    """
    # Kept whole (over 60 lines): one evaluation, mode by mode, from decoding to the files it writes.
    from tqdm.auto import tqdm

    encoder = TextEncoder(model.tokenizer, cfg.data, cfg.model.use_chat_template)
    encs = [encoder.encode(ex) for ex in examples]
    was_training = model.training
    model.eval()
    results: dict[str, dict] = {}
    bpt = kv_bytes_per_token(model)
    eos = model.tokenizer.eos_token_id
    try:
        for mode in modes:
            if mode not in MODES:
                raise ValueError(f"unknown eval mode {mode!r}; choose from {', '.join(MODES)}")
            preds = []
            start = time.perf_counter()
            bs = cfg.eval.batch_size
            for i in tqdm(range(0, len(encs), bs), desc=f"{desc}:{mode}", leave=False, disable=not cfg.train.progress):
                chunk_e, chunk_x = encs[i : i + bs], examples[i : i + bs]
                gen = generate(model, chunk_e, mode, cfg)
                for ex, enc, toks, n_pass, kv in zip(chunk_x, chunk_e, gen.tokens, gen.passes, gen.kv_tokens):
                    generation = model.tokenizer.decode(toks, skip_special_tokens=True)
                    text = graded_text(generation, mode, cfg)
                    verdict = grade(text, ex.answer, cfg.data.answer_prefix)
                    preds.append(
                        {
                            "source_id": ex.source_id,
                            "question": ex.question,
                            "gold": ex.answer,
                            "cot_steps": len(ex.steps),
                            "prediction": text,
                            "prompt": prompt_text(model, enc, mode, cfg),
                            "target": ex.answer,
                            "generation": generation,
                            "verdicts": verdict,
                            "correct": verdict["strict"],
                            "correct_flexible": verdict["flexible"],
                            "truncated": hit_cap(toks, eos),
                            "forward_passes": n_pass,
                            "generated_tokens": len(toks),
                            "kv_cache_bytes": kv * bpt,
                        }
                    )
            results[mode] = summarise(preds, time.perf_counter() - start)
            if out_dir is not None:
                lines = "".join(json.dumps(p) + "\n" for p in preds)
                atomic_write(Path(out_dir) / f"predictions_{mode}.jsonl", lambda f, s=lines: f.write_text(s))
    finally:
        model.train(was_training)
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "eval_metrics.json", results)
    return results


def eval_modes(cfg: KavaConfig) -> list[str]:
    """What a trained model is evaluated on: its own mode."""
    return {"cot": ["cot"], "nocot": ["nocot"], "teacher": ["cot"]}.get(cfg.train.mode, list(cfg.eval.modes))


def check_modes(modes: list[str] | None) -> None:
    """``--modes``: known modes, at least one, each once (None: the run's own)."""
    from ..config import ConfigError

    if modes is None:
        return
    for mode in modes:
        if mode not in MODES:
            raise ConfigError(f"eval modes: {mode!r} is not one of {', '.join(MODES)}")
    repeated = sorted({m for m in modes if modes.count(m) > 1})
    if repeated:
        raise ConfigError(f"eval modes: {', '.join(repeated)} given twice; give each mode once")


def model_differences(run, other) -> list[tuple[str, object, object]]:
    """``(field, run's value, other's value)`` for each model field the trained weights fix: the
    architecture and the adapter."""
    from ..model import architecture_differences

    out = architecture_differences(run, other)
    for name in ("adapter", "lora_r", "lora_alpha", "lora_target_modules"):
        if getattr(run, name) != getattr(other, name):
            out.append((f"model.{name}", getattr(run, name), getattr(other, name)))
    return out


def evaluate_checkpoint(
    checkpoint: str | Path, overrides=(), modes: list[str] | None = None, out: str | Path | None = None
) -> tuple[dict[str, dict], Path]:
    """Evaluate a checkpoint folder (or a run folder: its latest checkpoint) on the run's own
    evaluation data, with ``key=value`` ``overrides`` of its config (``data.eval=...``, say).

    ``modes``: default :func:`eval_modes`; ``out``: default ``CHECKPOINT/eval/<data>-<split>[-<limit>]``
    (:func:`~kava.evaluation.results.eval_folder_name`). Writes the
    files of :func:`evaluate` and ``results.json`` (the metrics and their provenance);
    returns the results and the folder they were written to.
    """
    from ..config import ConfigError, config_from_dict, deep_merge, parse_overrides
    from ..data.loaders import load_data
    from ..model.checkpoints import checkpoint_config, find_checkpoint, load_checkpoint

    check_modes(modes)
    ckpt = find_checkpoint(checkpoint)
    check_output_folder(Path(out) if out else ckpt / "eval", "--out")
    # Every override is checked against the checkpoint's config before any model is built; the
    # permission to run a base model's own code comes from the command line alone.
    extra = parse_overrides(list(overrides))
    trust = (
        bool(extra.get("model", {}).get("trust_remote_code", False)) if isinstance(extra.get("model"), dict) else False
    )
    stored = checkpoint_config(ckpt, trust)
    cfg = config_from_dict(deep_merge(stored.to_dict(), extra))
    changed = model_differences(stored.model, cfg.model)
    if changed:  # the weights decide the model: an override would only mislabel the results
        field, theirs, ours = changed[0]
        raise ConfigError(
            f"config field '{field}': the checkpoint was trained with {theirs!r}, an evaluation cannot change the "
            f"model (got {ours!r}); override eval.* and data.* only"
        )
    eval_examples = load_data(cfg, "eval")
    model = load_checkpoint(ckpt, trust_remote_code=cfg.model.trust_remote_code)
    model.cfg = cfg
    out = Path(out) if out else ckpt / "eval" / eval_folder_name(cfg)
    modes = modes or eval_modes(cfg)
    results = evaluate(model, eval_examples, cfg, modes, out)
    write_results(out, results, provenance(cfg, modes, ckpt, str(next(model.parameters()).device)))
    return results, out


def evaluate_pretrained(
    name_or_path: str,
    config: str | Path | None = None,
    overrides=(),
    modes: list[str] | None = None,
    out: str | Path | None = None,
) -> tuple[dict[str, dict], Path]:
    """Evaluate a plain model (a transformers folder, a hub id, a .gguf file) that has no kava
    checkpoint, untrained: the baseline before any step. ``config`` (a YAML file) and
    ``overrides`` set the data and decoding as for a run; ``modes``: ``cot``, ``nocot``
    (default both; ``student`` needs a trained projection and latent tokens, so it is
    refused); ``out``: default ``runs/eval/<model name>/<data>-<split>[-<limit>]``."""
    from ..config import ConfigError, load_config
    from ..data.loaders import load_data
    from ..model.checkpoints import build_model

    check_modes(modes)
    modes = modes or ["cot", "nocot"]
    check_output_folder(Path(out) if out else Path("runs") / "eval" / Path(name_or_path.rstrip("/")).name, "--out")
    if "student" in modes:
        raise ConfigError(
            "kava eval --model: mode 'student' needs a trained kava checkpoint (latent tokens, projection); use "
            "--modes cot,nocot"
        )
    cfg = load_config(
        config, [*overrides, f"model.name_or_path={name_or_path}", "model.adapter=full", "model.init_from="]
    )
    eval_examples = load_data(cfg, "eval")  # bad data fails before the model is loaded
    model = build_model(cfg, with_adapter=False)
    chosen = any(o.split("=", 1)[0].strip() == "model.use_chat_template" for o in overrides)
    if config is None and not chosen and getattr(model.tokenizer, "chat_template", None):
        # The defaults put a bare question in front of an Instruct model: say so, and how to match the runs.
        log.warning(
            "kava eval --model without --config: %s has a chat template, but the default config gives the "
            "question without it (model.use_chat_template=false) and decodes with the default eval.*: add "
            "model.use_chat_template=true, or --config the file the runs to compare with were trained with",
            name_or_path,
        )
    out = Path(out) if out else Path("runs") / "eval" / Path(name_or_path.rstrip("/")).name / eval_folder_name(cfg)
    results = evaluate(model, eval_examples, cfg, modes, out)
    write_results(out, results, provenance(cfg, modes, None, str(next(model.parameters()).device)))
    return results, out

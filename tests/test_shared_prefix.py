"""train.shared_prefix: the question encoded once for the teacher and the student gives the
same losses, metrics, gradients and instruments as encoding it in each mode (tiny Llama and
Qwen2, with and without padding and a BOS), and falls back, saying so once, where the two
modes' sequences do not start alike."""

import dataclasses
import logging

import pytest
import torch

from conftest import tiny_config
from kava.data.schema import Example
from kava.data.sequences import TextEncoder, student_batch, teacher_batch
from kava.distill import objective as objective_module
from kava.distill.instruments import measure
from kava.distill.objective import Objective, shares_question
from kava.model import build_model
from kava.model.latent import encode_prefix
from kava.model.teacher import teacher_forward

MIXED = [  # questions of different lengths: the question is left-padded
    Example("7*2-7", ("<<7*2=4>>", "<<4-7=7>>"), "7", "a"),
    Example("3+4+1+2", ("<<3+4=7>>", "<<7+1=8>>", "<<8+2=0>>"), "0", "b"),
    Example("5*5", ("<<5*5=5>>",), "5", "c"),
    Example("9-3-3", ("<<9-3=6>>", "<<6-3=3>>"), "3", "d"),
]
EQUAL = [  # one question length: no padding in the question
    Example("7*2-7", ("<<7*2=4>>", "<<4-7=7>>"), "7", "a"),
    Example("9-3-3", ("<<9-3=6>>", "<<6-3=3>>"), "3", "d"),
    Example("1+2+3", ("<<1+2=3>>", "<<3+3=6>>"), "6", "e"),
]


def _setup(arch, shared, examples=MIXED, bos=False, **sections):
    torch.manual_seed(0)
    train = {"shared_prefix": shared, **sections.pop("train", {})}
    cfg = tiny_config(model={"tiny": {"arch": arch, "num_heads": 4, "num_kv_heads": 2}}, train=train, **sections)
    model = build_model(cfg)
    model.eval()  # no dropout: the two ways must then agree to rounding
    obj = Objective(model, cfg)
    enc = TextEncoder(model.tokenizer, cfg.data)
    encs = [enc.encode(e) for e in examples]
    if bos:  # a BOS in front of every question, as a Llama tokenizer writes it
        bos_id = model.tokenizer.eos_token_id
        encs = [dataclasses.replace(e, question=[bos_id] + e.question) for e in encs]
    return cfg, model, obj, encs


def _step(arch, shared, **kw):
    cfg, model, obj, encs = _setup(arch, shared, **kw)
    calls = []
    hook = model.decoder.register_forward_hook(
        lambda m, a, k, o: calls.append(k["inputs_embeds"].shape[1]), with_kwargs=True
    )
    batch = obj.make_batch(encs)
    try:
        loss, metrics = obj(batch)
    finally:
        hook.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads, calls, batch


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", ["jacobi", "sequential"])
@pytest.mark.parametrize("examples,bos", [(MIXED, False), (MIXED, True), (EQUAL, False), (EQUAL, True)])
@pytest.mark.parametrize("teacher_ce", [1.0, 0.0])
def test_shared_prefix_gives_the_same_loss_metrics_and_gradients(arch, scheme, examples, bos, teacher_ce):
    kw = dict(
        examples=examples,
        bos=bos,
        latent={"scheme": scheme, "num_latents": 3, "iterations": 2},
        loss={"teacher_ce": teacher_ce, "latent_ce": 1.0, "compression": "rkv"},
    )
    ref_loss, ref_metrics, ref_grads, ref_calls, ref_batch = _step(arch, False, **kw)
    loss, metrics, grads, calls, batch = _step(arch, True, **kw)
    assert "question_len" in batch["teacher"] and "question_len" not in ref_batch["teacher"]
    q = batch["teacher"]["question_len"]
    # One pass over the question, then the teacher and the student read only what follows it.
    assert (
        calls[0] == q
        and calls[1]
        == ref_calls[0] - (ref_batch["teacher"]["input_ids"].shape[1] - batch["teacher"]["input_ids"].shape[1]) - q
    )
    assert calls[2] == ref_calls[1] - q and calls[3:] == ref_calls[2:]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        torch.testing.assert_close(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6, msg=k)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_pre_rope_targets_are_the_same_with_a_left_padded_question():
    kw = dict(loss={"rope": "pre", "compression": "rkv"})
    ref_loss, ref_metrics, ref_grads, _, _ = _step("llama", False, **kw)
    loss, metrics, grads, _, _ = _step("llama", True, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["kv"], ref_metrics["kv"], rtol=1e-5, atol=1e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_question_left_teacher_batch_keeps_every_examples_outputs():
    """The layout alone (one full pass, no shared cache): each example's logits, CE, CODI states
    and CoT keys are those of the right-padded batch, column for column after the shift."""
    cfg, model, obj, encs = _setup("llama", False)
    right = teacher_batch(encs, obj.pad_id, with_cot=True)
    left = teacher_batch(encs, obj.pad_id, with_cot=True, question_left=True)
    a = teacher_forward(model, right, want_queries=True, want_logits=True)
    b = teacher_forward(model, left, want_queries=True, want_logits=True)
    torch.testing.assert_close(b.ce, a.ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        b.queries * left["answer_valid"][None, :, None, :, None],
        a.queries * right["answer_valid"][None, :, None, :, None],
        rtol=1e-5,
        atol=1e-5,
    )
    q = left["question_len"]
    for i, e in enumerate(encs):
        shift = q - len(e.question)
        n = int(right["attention_mask"][i].sum())
        assert torch.equal(left["input_ids"][i, shift : shift + n], right["input_ids"][i, :n])
        assert torch.equal(left["labels"][i, shift : shift + n], right["labels"][i, :n])
        assert torch.equal(left["cot_step"][i, shift : shift + n], right["cot_step"][i, :n])
        assert int(left["distill_pos"][i]) == int(right["distill_pos"][i]) + shift
        torch.testing.assert_close(b.logits[i, shift : shift + n], a.logits[i, :n], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.keys[:, i, :, shift : shift + n], a.keys[:, i, :, :n], rtol=1e-5, atol=1e-5)
    # And from the question's cache: the same again.
    sb = student_batch(encs, obj.pad_id, model.bot_id, model.eot_id, 3)
    question = encode_prefix(model, sb["prefix_ids"][:, :q], sb["prefix_mask"][:, :q])
    c = teacher_forward(model, left, want_queries=True, want_logits=True, question=question)
    for name in ("ce", "hidden", "keys", "values", "logits"):
        torch.testing.assert_close(getattr(c, name), getattr(b, name), rtol=1e-5, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="question_left"):
        teacher_forward(model, right, want_queries=False, question=question)


def test_instruments_are_unchanged():
    res = {}
    for shared in (False, True):
        cfg, model, obj, encs = _setup("llama", shared, eval={"instruments": True})
        res[shared] = measure(obj, encs, keeps=True)
    assert res[True]["logit_lens"] == res[False]["logit_lens"]
    keeps = {k: v for k, v in res[True]["selector_keeps"].items() if k != "random"}
    assert keeps == {k: v for k, v in res[False]["selector_keeps"].items() if k != "random"} and "rkv" in keeps
    # The random selector draws one number per column: the columns moved, so it keeps other
    # positions (the same distribution), as many of them.
    assert res[True]["selector_keeps"]["random"]["slots"] == res[False]["selector_keeps"]["random"]["slots"]
    for k, v in res[False]["kv_alignment"].items():
        assert res[True]["kv_alignment"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k


def test_shares_question_sees_a_different_start():
    cfg, model, obj, encs = _setup("llama", True)
    tb = teacher_batch(encs, obj.pad_id, with_cot=True, question_left=True)
    sb = student_batch(encs, obj.pad_id, model.bot_id, model.eot_id, 3)
    assert shares_question(tb, sb)
    other = dict(sb, prefix_ids=sb["prefix_ids"].clone())
    other["prefix_ids"][1, -2] = other["prefix_ids"][1, -2] + 1  # the last question token of one example
    assert not shares_question(tb, other)
    longer = dict(
        sb,
        prefix_ids=torch.cat([sb["prefix_ids"][:, :1], sb["prefix_ids"]], 1),
        prefix_mask=torch.cat([sb["prefix_mask"][:, :1] & False, sb["prefix_mask"]], 1),
    )
    assert not shares_question(tb, longer)


def test_different_prefixes_fall_back_and_say_so_once(monkeypatch, caplog):
    ref_loss, _, ref_grads, ref_calls, _ = _step("llama", False)
    monkeypatch.setattr(objective_module, "shares_question", lambda tb, sb: False)
    with caplog.at_level(logging.WARNING, logger="kava.train"):
        cfg, model, obj, encs = _setup("llama", True)
        batches = [obj.make_batch(encs) for _ in range(3)]
    assert all("question_len" not in b["teacher"] for b in batches)
    assert caplog.text.count("train.shared_prefix") == 1
    loss, _ = obj(batches[0])
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=0, atol=0)

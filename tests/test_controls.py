"""The content controls: slot-mean, matched Gaussian, counterfactual CoT and the oracle, on
hand-made tensors and examples where the right answer is known, and end to end on a tiny model."""

import random

import pytest
import torch

from conftest import tiny_config
from kava.config import DataConfig
from kava.data.counterfactual import counterfactual_example, counterfactual_steps, derangement
from kava.data.schema import Example, result_span
from kava.data.sequences import RESULT, TOKEN_TYPES, TextEncoder, teacher_batch
from kava.data.synthetic import products_example
from kava.distill.compression import SelectRequest, compress_cache, get_selector, select
from kava.model.tokenizer import build_synthetic_tokenizer


def _full_cot(n_layers=2, b=4, h=2, m=3, d=5, seed=0):
    """A cache whose CoT is exactly ``m`` long, so R-KV keeps every CoT entry, in order."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n_layers, b, h, m + 2, d, generator=g)
    values = torch.randn(n_layers, b, h, m + 2, d, generator=g)
    cot = torch.zeros(b, m + 2, dtype=torch.bool)
    cot[:, 1 : m + 1] = True
    queries = torch.randn(n_layers, b, h, 1, d, generator=g)
    ans = torch.ones(b, 1, dtype=torch.bool)
    return keys, values, queries, cot, ans


def test_slot_mean_is_the_batch_mean_of_the_rkv_targets():
    keys, values, queries, cot, ans = _full_cot()
    c = compress_cache(get_selector("slot_mean"), keys, values, queries, cot, ans, 3)
    want_k = keys[..., 1:4, :].mean(1, keepdim=True).expand_as(c.keys)
    want_v = values[..., 1:4, :].mean(1, keepdim=True).expand_as(c.values)
    torch.testing.assert_close(c.keys, want_k)
    torch.testing.assert_close(c.values, want_v)
    assert c.valid.all() and c.indices is None


def test_slot_mean_leaves_out_slots_an_example_could_not_fill():
    keys, values, queries, cot, ans = _full_cot(b=3)
    cot[2, 3] = False  # example 2 has a CoT of 2: its third slot is empty
    c = compress_cache(get_selector("slot_mean"), keys, values, queries, cot, ans, 3)
    assert c.valid[:, 2, :, 2].logical_not().all() and c.valid[:, :2].all()
    # Slot 2 averages examples 0 and 1 only (their third CoT entry, position 3).
    torch.testing.assert_close(c.keys[:, 0, :, 2], keys[:, :2, :, 3].mean(1))
    # A slot only one example fills would be that example's own entry: it is masked out instead.
    cot[1, 3] = False
    for name in ("slot_mean", "gaussian"):
        c = compress_cache(get_selector(name), keys, values, queries, cot, ans, 3)
        assert not c.valid[..., 2].any() and c.valid[..., :2].all()
    with pytest.raises(ValueError, match="at least 2"):
        compress_cache(get_selector("slot_mean"), keys[:, :1], values[:, :1], queries[:, :1], cot[:1], ans[:1], 3)
    with pytest.raises(ValueError, match="no indices"):
        select("slot_mean", keys[0], queries[0], cot, ans, 3)


def test_gaussian_matches_the_batch_moments_of_each_entry():
    keys, values, queries, cot, ans = _full_cot(n_layers=1, b=4000, h=1, m=2, d=3, seed=1)
    keys = keys * torch.tensor([1.0, 3.0, 0.5]) + torch.tensor([2.0, -1.0, 0.0])
    target = keys[..., 1:3, :]
    g = torch.Generator().manual_seed(0)
    c = compress_cache(get_selector("gaussian"), keys, values, queries, cot, ans, 2, generator=g)
    assert c.keys.shape == target.shape and c.indices is None
    torch.testing.assert_close(c.keys.mean(1), target.mean(1), atol=0.15, rtol=0)
    torch.testing.assert_close(c.keys.std(1), target.std(1), atol=0.15, rtol=0.05)
    assert not torch.allclose(c.keys, target)  # noise, not the examples' own entries
    # Seeded: the same generator state gives the same draw.
    again = compress_cache(
        get_selector("gaussian"), keys, values, queries, cot, ans, 2, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(again.keys, c.keys)


def test_oracle_keeps_every_result_token_then_fills_in_rkv_order():
    torch.manual_seed(0)
    b, h, n, d = 2, 2, 8, 4
    keys = torch.randn(b, h, n, d)
    queries = torch.randn(b, 4, 2, d)
    cot = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ans = torch.ones(b, 2, dtype=torch.bool)
    types = torch.full((b, n), TOKEN_TYPES.index("digit"))
    types[0, 3] = types[0, 6] = RESULT
    types[1, 2] = types[1, 7] = RESULT
    types[~cot] = -1
    idx, valid = select("oracle", keys, queries, cot, ans, 2, token_types=types)
    assert idx[0].tolist() == [[3, 6], [3, 6]] and idx[1].tolist() == [[2, 7], [2, 7]] and valid.all()
    # A budget of 4: both results, and the two best other CoT tokens by R-KV score.
    idx4, _ = select("oracle", keys, queries, cot, ans, 4, token_types=types)
    rkv = get_selector("rkv").score(SelectRequest(keys, None, queries, cot, ans, 4)).masked_fill(~cot[:, None], -1.0)
    for bi, results in ((0, {3, 6}), (1, {2, 7})):
        for hi in range(h):
            others = [i for i in rkv[bi, hi].argsort(descending=True).tolist() if i not in results][:2]
            assert set(idx4[bi, hi].tolist()) == results | set(others)
    with pytest.raises(ValueError, match="token types"):
        select("oracle", keys, queries, cot, ans, 2)


def test_result_span_and_token_types_of_both_trace_styles():
    assert result_span("<<7*2=4>>") == (6, 7)
    assert result_span("7 times 2 is 14.") == (13, 15)
    assert result_span("no number") is None
    tok = build_synthetic_tokenizer()
    tok.add_tokens(["<bot>", "<eot>"], special_tokens=True)
    enc = TextEncoder(tok, DataConfig())
    eq = enc.encode(products_example((3, 4, 5), "eq", "a"))
    assert [TOKEN_TYPES[t] for t in eq.step_types[0]] == [
        "open",
        "digit",
        "operator",
        "digit",
        "equals",
        "result",
        "close",
    ]
    nl = enc.encode(products_example((3, 4, 5), "nl", "a"))
    assert [TOKEN_TYPES[t] for t in nl.step_types[1]] == ["digit", "operator", "digit", "equals", "result", "separator"]
    tb = teacher_batch([eq, nl], enc.pad_id, drop_last_step=True)
    cot = tb["cot_step"] >= 0
    assert ((tb["token_type"] >= 0) == cot).all()
    assert int((tb["token_type"] == RESULT).sum()) == 2  # one kept step each, one result token each


def test_counterfactual_maps_results_and_carries_them_forward():
    shift = {str(i): str((i + 1) % 10) for i in range(10)}
    assert counterfactual_steps(["<<3*4=2>>", "<<5*6=0>>", "<<2+0=2>>"], shift) == [
        "<<3*4=3>>",
        "<<5*6=1>>",
        "<<3+1=3>>",
    ]
    assert counterfactual_steps(["3 times 4 is 12.", "12 plus 5 is 17."], shift) == [
        "3 times 4 is 23.",
        "23 plus 5 is 28.",
    ]
    for s in range(20):
        m = derangement(random.Random(s))
        assert sorted(m.values()) == list("0123456789") and all(k != v for k, v in m.items())
    ex = Example("1*2+3", ("<<1*2=2>>", "<<2+3=5>>"), "5", "id7")
    cf = counterfactual_example(ex, seed=0)
    assert cf == counterfactual_example(ex, seed=0) and cf.question == ex.question and cf.answer == ex.answer
    assert all(a != b for a, b in zip(cf.steps, ex.steps))
    assert [len(s) for s in cf.steps] == [len(s) for s in ex.steps]


def _batch_loss(compression, **loss):
    from kava.distill.objective import Objective
    from kava.model.checkpoints import build_model

    cfg = tiny_config(
        loss={"compression": compression, "drop_last_step": False, **loss},
        data={"train": "synthetic-products", "eval": "synthetic-products"},
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    obj = Objective(model, cfg)
    model.eval()
    return obj, obj.compute(obj.make_batch(_encs(obj)))


def _encs(obj):
    """The first four training examples of ``obj``'s config, encoded (the batch of :func:`_batch_loss`)."""
    from kava.data.loaders import load_data

    enc = TextEncoder(obj.model.tokenizer, obj.cfg.data)
    return [enc.encode(e) for e in load_data(obj.cfg, "train")[:4]]


def test_counterfactual_targets_come_from_the_counterfactual_pass():
    obj, out = _batch_loss("counterfactual")
    assert obj.source.name == "counterfactual"
    _, ref = _batch_loss("rkv")
    t_cf, t_rkv = out.kv[0], ref.kv[0]
    assert t_cf.keys.shape == t_rkv.keys.shape
    # The first layer's keys at a result token differ (other digits), at the bracket tokens they do not.
    assert not torch.allclose(t_cf.keys, t_rkv.keys)
    torch.testing.assert_close(out.kv[1], ref.kv[1])  # the student is the same
    torch.testing.assert_close(out.metrics["codi"], ref.metrics["codi"])  # CODI targets: the true teacher


def test_counterfactual_own_pass_keeps_no_cache(monkeypatch):
    """The own teacher pass gives the counterfactual run its CODI states and CE only: it keeps
    no KV cache copy or answer queries, and the loss is what it is with them kept."""
    import kava.distill.objective as objective
    from kava.distill.targets import CounterfactualPass

    calls = []
    real = objective.teacher_forward

    def spy(model, batch, want_queries, want_cache=True, **kw):
        calls.append((want_queries, want_cache))
        return real(model, batch, want_queries, want_cache, **kw)

    monkeypatch.setattr(objective, "teacher_forward", spy)
    _, lean = _batch_loss("counterfactual", layer_std=False)
    assert calls == [(False, False)]
    # Under loss.layer_std the true pass keeps its cache for the KV normaliser, still no queries.
    calls.clear()
    _, scaled = _batch_loss("counterfactual", layer_std=True)
    assert calls == [(False, True)]
    monkeypatch.setattr(CounterfactualPass, "kv_from_teacher_pass", True)
    calls.clear()
    _, kept = _batch_loss("counterfactual", layer_std=False)
    assert calls == [(True, True)]
    torch.testing.assert_close(lean.loss, kept.loss, rtol=0, atol=0)
    torch.testing.assert_close(lean.kv[0].keys, kept.kv[0].keys, rtol=0, atol=0)
    calls.clear()
    _, scaled_kept = _batch_loss("counterfactual", layer_std=True)
    torch.testing.assert_close(scaled.loss, scaled_kept.loss, rtol=0, atol=0)


def _kv_scales(monkeypatch, compression, **loss):
    """The ``scale`` the KV loss of one tiny batch was called with, and the step's output."""
    from kava import losses

    seen = []
    real = losses.kv_loss

    def spy(*args, **kw):
        seen.append(args[6] if len(args) > 6 else kw.get("scale"))
        return real(*args, **kw)

    monkeypatch.setattr(losses, "kv_loss", spy)
    obj, out = _batch_loss(compression, **loss)
    monkeypatch.setattr(losses, "kv_loss", real)
    assert len(seen) == 1 and seen[0] is not None
    return obj, out, seen[0]


@pytest.mark.parametrize("rope", ["post", "pre"])
def test_every_arm_is_scaled_by_the_true_teachers_cot_cache_std(monkeypatch, rope):
    """One KV normaliser for every arm on a batch: the per-layer std of the true teacher's K and
    V over all CoT positions, whatever the selector; not the std of each arm's own targets."""
    from kava import losses

    obj, ref, scale = _kv_scales(monkeypatch, "rkv", rope=rope)
    # By hand: the teacher's whole cache at the CoT positions of the batch (RoPE undone for pre).
    tb = obj.make_batch(_encs(obj))["teacher"]
    with torch.no_grad():
        t = obj.teacher_pass(tb)
    keys = t.keys
    if rope == "pre":
        pos = torch.arange(keys.shape[3])[None].expand(keys.shape[1], -1)
        keys = obj.unrotate(keys, pos)
    cot = tb["cot_step"] >= 0
    for layer in range(keys.shape[0]):
        for row, x in enumerate((keys, t.values)):
            entries = x[layer].permute(0, 2, 1, 3)[cot]  # [n_cot, H, d]
            assert scale[row, layer].item() == pytest.approx(entries.float().std(unbiased=False).item(), rel=1e-5)
    arms = ["right_crop", "mean_pool", "slot_mean", "shuffled", "gaussian", "counterfactual", "oracle"]
    for name in arms:
        _, out, other = _kv_scales(monkeypatch, name, rope=rope)
        torch.testing.assert_close(other, scale, rtol=0, atol=0, msg=name)
        if name == "slot_mean":
            slot_mean_target = out.kv[0]
    # The old normaliser (each arm's own targets' std) would differ: slot-mean targets spread less.
    rkv_t = ref.kv[0]
    own_rkv = losses.kv_scale(rkv_t.keys, rkv_t.values, rkv_t.valid)
    own_slot_mean = losses.kv_scale(slot_mean_target.keys, slot_mean_target.values, slot_mean_target.valid)
    assert (own_slot_mean < own_rkv).all()


@pytest.mark.parametrize("compression", ["slot_mean", "gaussian", "counterfactual", "oracle"])
def test_each_control_trains_end_to_end(tmp_path, compression):
    from kava.training import train

    cfg = tiny_config(
        loss={"compression": compression},
        data={"train": "synthetic-products", "eval": "synthetic-products"},
        train={"output_dir": str(tmp_path / compression), "max_steps": 2},
    )
    result = train(cfg)
    assert result["state"] == "finished" and result["step"] == 2
    assert torch.isfinite(torch.tensor(result["train"]["kv"])) and result["train"]["kv"] > 0

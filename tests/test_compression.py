"""Selectors on hand-made tensors where the right answer is known."""

import math

import pytest
import torch

from kava.distill.compression import (
    SELECTORS,
    attention_importance,
    compress_cache,
    get_selector,
    partners,
    redundancy_scores,
    select,
)
from kava.distill.compression.base import top_budget
from kava.distill.compression.rkv import redundancy_scores_quadratic


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_attention_importance_matches_reference_loop_with_gqa():
    torch.manual_seed(0)
    b, h_kv, g, n, a, d = 2, 2, 3, 7, 4, 8
    keys = torch.randn(b, h_kv, n, d)
    queries = torch.randn(b, h_kv * g, a, d)
    cot = _mask([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    ans = _mask([[1, 1, 1, 0], [1, 1, 1, 1]])
    got = attention_importance(keys, queries, cot, ans)
    # Reference: expand keys to the query heads with repeat_interleave (HF's GQA layout).
    k_rep = keys.repeat_interleave(g, dim=1)
    for bi in range(b):
        for hk in range(h_kv):
            acc = torch.zeros(n)
            count = 0
            for hq in range(hk * g, (hk + 1) * g):
                for ai in range(a):
                    if not ans[bi, ai]:
                        continue
                    logits = queries[bi, hq, ai] @ k_rep[bi, hq].T / math.sqrt(d)
                    logits[~cot[bi]] = -float("inf")
                    acc += torch.softmax(logits, -1)
                    count += 1
            ref = acc / count
            ref = ref / ref.sum()
            torch.testing.assert_close(got[bi, hk], ref, atol=1e-5, rtol=1e-5)
    assert torch.all(got[~cot[:, None, :].expand_as(got)] == 0)


def test_redundancy_prefers_the_odd_key_out():
    # Three identical keys and one orthogonal key: the orthogonal one is least redundant.
    k = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])[None, None]
    cot = _mask([[1, 1, 1, 1, 0]])
    r = redundancy_scores(k, cot)
    assert r[0, 0, 4] == 0  # outside the CoT
    assert torch.isclose(r[0, 0, :4].sum(), torch.tensor(1.0))
    assert r[0, 0, 3] > r[0, 0, 0]
    # Exact value: mean similarity of key 0 is (1 + 1 + 0) / 4, of key 3 it is 0.
    logits = torch.tensor([-0.5, -0.5, -0.5, 0.0])
    torch.testing.assert_close(r[0, 0, :4], torch.softmax(logits, -1))


def test_rkv_keeps_top_scores_in_time_order():
    # lam=1: pure attention. One query that looks exactly at keys 4 and 2 (in that order of strength).
    d = 4
    keys = torch.zeros(1, 1, 6, d)
    keys[0, 0, 2, 0] = 3.0
    keys[0, 0, 4, 0] = 6.0
    queries = torch.zeros(1, 1, 1, d)
    queries[0, 0, 0, 0] = 2.0
    cot = _mask([[0, 1, 1, 1, 1, 1]])
    idx, valid = select("attention", keys, queries, cot, _mask([[1]]), budget=2)
    assert idx.tolist() == [[[2, 4]]]
    assert valid.all()


@pytest.mark.parametrize("method", [m for m in SELECTORS if m != "mean_pool" and not get_selector(m).builds_entries
                                    and not get_selector(m).needs_token_types])
def test_padding_and_non_cot_never_kept_and_short_cot_masks_slots(method):
    torch.manual_seed(1)
    b, h, n, d = 3, 2, 9, 4
    keys = torch.randn(b, h, n, d)
    queries = torch.randn(b, 4, 3, d)
    cot = _mask([[0, 1, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    ans = _mask([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
    g = torch.Generator().manual_seed(0)
    idx, valid = select(method, keys, queries, cot, ans, budget=4, generator=g)
    assert idx.shape == (b, h, 4) and valid.shape == (b, h, 4)
    if method == "shuffled":  # rolled along the batch: example i gets example i-1's selection
        cot = cot.roll(1, 0)
    n_cot = cot.sum(-1)
    for bi in range(b):
        for hi in range(h):
            v = valid[bi, hi]
            assert int(v.sum()) == min(4, int(n_cot[bi]))
            kept = idx[bi, hi][v]
            assert cot[bi, kept].all(), "kept a non-CoT position"
            assert torch.all(kept[1:] > kept[:-1]), "not in time order"
            assert not v[int(v.sum()) :].any(), "invalid slots must come last"


def test_budget_larger_than_sequence_does_not_crash():
    keys = torch.randn(1, 1, 3, 2)
    cot = _mask([[1, 1, 0]])
    idx, valid = select("rkv", keys, torch.randn(1, 1, 1, 2), cot, _mask([[1]]), budget=8)
    assert idx.shape == (1, 1, 8)
    assert valid[0, 0].tolist() == [True, True] + [False] * 6
    assert idx[0, 0, :2].tolist() == [0, 1]


def test_positional_selectors_known_answers():
    keys = torch.randn(1, 1, 12, 2)
    cot = _mask([[0, 0] + [1] * 8 + [0, 0]])  # CoT at 2..9
    first, _ = select("right_crop", keys, None, cot, None, budget=3)
    last, _ = select("last", keys, None, cot, None, budget=3)
    stride, _ = select("stride", keys, None, cot, None, budget=4)
    assert first.tolist() == [[[2, 3, 4]]]
    assert last.tolist() == [[[7, 8, 9]]]
    assert stride.tolist() == [[[2, 4, 6, 8]]]  # ranks 0, 2, 4, 6


def test_random_selector_depends_on_generator_seed():
    keys = torch.randn(2, 2, 30, 2)
    cot = torch.ones(2, 30, dtype=torch.bool)
    a, _ = select("random", keys, None, cot, None, 5, generator=torch.Generator().manual_seed(0))
    b, _ = select("random", keys, None, cot, None, 5, generator=torch.Generator().manual_seed(0))
    c, _ = select("random", keys, None, cot, None, 5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_mean_pool_averages_contiguous_chunks():
    keys = torch.arange(8, dtype=torch.float32).view(1, 1, 8, 1).repeat(1, 1, 1, 2)
    values = -keys
    cot = _mask([[0, 1, 1, 1, 1, 1, 1, 0]])  # CoT values 1..6 -> chunks (1,2) (3,4) (5,6)
    c = compress_cache(get_selector("mean_pool"), keys[None], values[None], None, cot, None, 3)
    assert c.indices is None
    torch.testing.assert_close(c.keys[0, 0, 0, :, 0], torch.tensor([1.5, 3.5, 5.5]))
    torch.testing.assert_close(c.values[0, 0, 0, :, 0], torch.tensor([-1.5, -3.5, -5.5]))
    # Fewer CoT tokens than slots: one token a slot, the rest invalid.
    c = compress_cache(get_selector("mean_pool"), keys[None], values[None], None, _mask([[0, 1, 1, 0, 0, 0, 0, 0]]), None, 4)
    assert c.valid[0, 0, 0].tolist() == [True, True, False, False]
    torch.testing.assert_close(c.keys[0, 0, 0, :2, 0], torch.tensor([1.0, 2.0]))


def test_compress_cache_layers_match_per_layer_select():
    torch.manual_seed(2)
    n_layers, b, h, n, d = 3, 2, 2, 10, 4
    keys = torch.randn(n_layers, b, h, n, d)
    values = torch.randn(n_layers, b, h, n, d)
    queries = torch.randn(n_layers, b, 4, 2, d)
    cot = torch.zeros(b, n, dtype=torch.bool)
    cot[:, 2:8] = True
    ans = torch.ones(b, 2, dtype=torch.bool)
    c = compress_cache(get_selector("rkv"), keys, values, queries, cot, ans, 3)
    for layer in range(n_layers):
        idx, valid = select("rkv", keys[layer], queries[layer], cot, ans, 3)
        assert torch.equal(c.indices[layer], idx)
        torch.testing.assert_close(c.keys[layer], keys[layer].gather(2, idx[..., None].expand(-1, -1, -1, d)))


def test_shuffled_rolls_examples_not_layers():
    torch.manual_seed(3)
    keys = torch.randn(2, 3, 1, 6, 2)  # layers, batch, heads, n, d
    cot = torch.ones(3, 6, dtype=torch.bool)
    queries = torch.randn(2, 3, 1, 1, 2)
    ans = torch.ones(3, 1, dtype=torch.bool)
    rkv = compress_cache(get_selector("rkv"), keys, keys, queries, cot, ans, 2)
    sh = compress_cache(get_selector("shuffled"), keys, keys, queries, cot, ans, 2)
    assert torch.equal(sh.keys, rkv.keys.roll(1, dims=1))
    with pytest.raises(ValueError, match="at least 2"):
        select("shuffled", keys[0, :1], queries[0, :1], cot[:1], ans[:1], 2)


def test_bf16_inputs_select_like_float32():
    torch.manual_seed(4)
    keys = torch.randn(2, 2, 16, 8)
    queries = torch.randn(2, 4, 3, 8)
    cot = torch.ones(2, 16, dtype=torch.bool)
    ans = torch.ones(2, 3, dtype=torch.bool)
    i32, _ = select("redundancy", keys, queries, cot, ans, 4)
    i16, _ = select("redundancy", keys.bfloat16(), queries.bfloat16(), cot, ans, 4)
    overlap = (i32[..., None] == i16[..., None, :]).any(-1).float().mean()
    assert overlap >= 0.75


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown compression method"):
        get_selector("nope")
    with pytest.raises(ValueError, match="no indices"):
        select("mean_pool", torch.zeros(1, 1, 2, 2), None, torch.ones(1, 2, dtype=torch.bool), None, 1)


def test_fast_redundancy_equals_the_quadratic_definition():
    torch.manual_seed(5)
    b, h, n, d = 3, 2, 23, 8
    keys = torch.randn(b, h, n, d)
    keys[0, 0, 4] = 0.0  # a zero key: normalises to zero in both forms
    keys[1, :, 7] = keys[1, :, 3]  # duplicated keys tie in both forms
    cot = torch.rand(b, n) > 0.3
    cot[2] = False  # an example without a CoT scores 0 everywhere
    fast, slow = redundancy_scores(keys, cot), redundancy_scores_quadratic(keys, cot)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    assert torch.all(fast[2] == 0)
    # The same selections as the quadratic form for every budget.
    for budget in (1, 4, 9):
        scored = [top_budget(s, cot, budget) for s in (fast, slow)]
        assert torch.equal(scored[0][0], scored[1][0]) and torch.equal(scored[0][1], scored[1][1])


@pytest.mark.parametrize("ids", [
    ["a", "b", "c", "d"],
    ["a", "b", "a", "c"],
    ["a", "a", "b", "b", "c", "c"],
    ["x", "y", "x", "x", "z", "y"],
    ["a", "a", "a", "b", "c", "d"],
])
def test_shuffled_partners_are_never_the_same_example(ids):
    partner, ok = partners(ids, len(ids))
    assert ok.all()
    assert all(ids[int(partner[i])] != ids[i] for i in range(len(ids)))
    assert sorted(partner.tolist()) == list(range(len(ids)))  # every example's targets used once


def test_shuffled_flags_examples_that_have_no_other_example():
    # Two copies of one example (possible at an epoch boundary with batch 2): no partner exists.
    partner, ok = partners(["a", "a"], 2)
    assert not ok.any()
    partner, ok = partners(["a", "a", "a", "b"], 4)  # 3 copies of 4: only 2 can be paired with 'b'
    ids = ["a", "a", "a", "b"]
    assert all(ids[int(partner[i])] != ids[i] for i in range(4) if ok[i])
    assert int(ok.sum()) == 2
    # Those slots never count in the KV loss: they are invalid.
    keys = torch.randn(1, 2, 1, 5, 2)
    cot = torch.ones(2, 5, dtype=torch.bool)
    c = compress_cache(get_selector("shuffled"), keys, keys, torch.randn(1, 2, 1, 1, 2), cot, torch.ones(2, 1, dtype=torch.bool), 2,
                       source_ids=["a", "a"])
    assert not c.valid.any()
    idx, valid = select("shuffled", keys[0], torch.randn(2, 1, 1, 2), cot, torch.ones(2, 1, dtype=torch.bool), 2, source_ids=["q", "q"])
    assert not valid.any()

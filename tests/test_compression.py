"""Selectors on hand-made tensors where the right answer is known."""

import math

import pytest
import torch

from kava.distill.compression import (
    SELECTORS,
    SelectRequest,
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


@pytest.mark.parametrize(
    "method",
    [
        m
        for m in SELECTORS
        if m != "mean_pool" and not get_selector(m).builds_entries and not get_selector(m).needs_token_types
    ],
)
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
    c = compress_cache(
        get_selector("mean_pool"), keys[None], values[None], None, _mask([[0, 1, 1, 0, 0, 0, 0, 0]]), None, 4
    )
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


@pytest.mark.parametrize(
    "ids",
    [
        ["a", "b", "c", "d"],
        ["a", "b", "a", "c"],
        ["a", "a", "b", "b", "c", "c"],
        ["x", "y", "x", "x", "z", "y"],
        ["a", "a", "a", "b", "c", "d"],
    ],
)
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
    c = compress_cache(
        get_selector("shuffled"),
        keys,
        keys,
        torch.randn(1, 2, 1, 1, 2),
        cot,
        torch.ones(2, 1, dtype=torch.bool),
        2,
        source_ids=["a", "a"],
    )
    assert not c.valid.any()
    idx, valid = select(
        "shuffled", keys[0], torch.randn(2, 1, 1, 2), cot, torch.ones(2, 1, dtype=torch.bool), 2, source_ids=["q", "q"]
    )
    assert not valid.any()


# --- rkv_pooled: R-KV as its authors' code scores it ----------------------------------


def _rkv_pooled_reference(keys, queries, cot_mask, answer_mask, lam, kernel=7, threshold=0.5):
    """The authors' algorithm written out, one example and KV head at a time, on that example's
    valid CoT keys and answer queries alone (loops, no masking tricks)."""
    b, h_kv, n, d = keys.shape
    g = queries.shape[1] // h_kv
    out = torch.zeros(b, h_kv, n)
    for i in range(b):
        cols = [c for c in range(n) if cot_mask[i, c]]
        rows = [a for a in range(queries.shape[2]) if answer_mask[i, a]]
        for h in range(h_kv):
            k = keys[i, h, cols].double()
            # importance: max over the group's query heads of the logits, softmax, mean, max-pool
            logits = torch.stack(
                [torch.stack([queries[i, h * g + j, a].double() @ k.T for a in rows]) for j in range(g)]
            )
            probs = torch.softmax(logits.max(0).values / math.sqrt(d), -1).mean(0)  # [C]
            full = torch.zeros(n, dtype=torch.float64)
            full[cols] = probs
            pooled = torch.tensor([max(full[max(0, c - kernel // 2) : c + kernel // 2 + 1]) for c in range(n)])
            # redundancy: cosine matrix, diagonal 0, each row's last similar entry 0, column mean, softmax
            u = k / k.norm(dim=-1, keepdim=True)
            sim = u @ u.T
            sim.fill_diagonal_(0.0)
            for r in range(len(cols)):
                similar = [c for c in range(len(cols)) if c != r and sim[r, c] > threshold]
                if similar:
                    sim[r, similar[-1]] = 0.0
            red = torch.softmax(sim.mean(0), -1)
            for j, c in enumerate(cols):
                out[i, h, c] = lam * pooled[c] - (1 - lam) * red[j]
    return out


@pytest.mark.parametrize("lam", [0.1, 0.0, 1.0, 0.5])
def test_rkv_pooled_matches_the_algorithm_written_out(lam):
    from kava.distill.compression import rkv_pooled_scores

    torch.manual_seed(3)
    b, h_kv, g, n, a, d = 3, 2, 2, 14, 4, 8
    keys = torch.randn(b, h_kv, n, d)
    keys[:, :, 6] = keys[:, :, 3] + 0.05 * torch.randn(b, h_kv, d)  # near-copies, so the threshold rule acts
    keys[:, :, 9] = keys[:, :, 3] + 0.05 * torch.randn(b, h_kv, d)
    queries = torch.randn(b, h_kv * g, a, d)
    cot = torch.zeros(b, n, dtype=torch.bool)
    cot[0, 2:12] = True
    cot[1, 0:14] = True
    cot[2, 3:8] = True
    ans = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    got = rkv_pooled_scores(keys, queries, cot, ans, lam)
    want = _rkv_pooled_reference(keys, queries, cot, ans, lam)
    torch.testing.assert_close(got * cot[:, None], want.float(), rtol=1e-5, atol=1e-6)


def test_rkv_pooled_spreads_attention_over_seven_neighbours():
    from kava.distill.compression import pooled_attention_importance

    n, d = 16, 4
    keys = torch.zeros(1, 1, n, d)
    keys[0, 0, 8, 0] = 10.0  # the one key the query attends to
    queries = torch.zeros(1, 1, 1, d)
    queries[0, 0, 0, 0] = 10.0
    cot = torch.ones(1, n, dtype=torch.bool)
    imp = pooled_attention_importance(keys, queries, cot, torch.ones(1, 1, dtype=torch.bool))[0, 0]
    peak = imp[8]
    assert torch.allclose(imp[5:12], peak.expand(7)) and peak > 0.9
    assert (imp[:5] < 0.01).all() and (imp[12:] < 0.01).all()
    unpooled = pooled_attention_importance(keys, queries, cot, torch.ones(1, 1, dtype=torch.bool), kernel=1)[0, 0]
    assert unpooled[8] == peak and (unpooled[7] < 0.01)


def test_rkv_pooled_keeps_the_latest_of_near_copies_where_rkv_does_not_look_at_time():
    from kava.distill.compression import retained_redundancy, select

    n, d = 8, 8
    keys = torch.eye(d)[None, None, :n].clone()  # orthogonal keys ...
    for c in (1, 3, 6):  # ... but three copies of one key
        keys[0, 0, c] = torch.eye(d)[0] + torch.eye(d)[7] * 0.01
    cot = torch.ones(1, n, dtype=torch.bool)
    red = retained_redundancy(keys, cot)[0, 0]
    # Column 6 lost rows 1 and 3 (it is their last similar key), column 3 lost row 6, column 1 nothing.
    assert red[6] < red[3] < red[1]
    idx, valid = select("rkv_pooled", keys, None, cot, None, 6, lam=0.0)
    kept = set(idx[0, 0][valid[0, 0]].tolist())
    assert 6 in kept and 1 not in kept  # of the copies, the latest stays
    # kava's rkv gives the three copies one score: no copy is preferred for being the latest.
    from kava.distill.compression import redundancy_scores

    r = redundancy_scores(keys, cot)[0, 0]
    assert torch.allclose(r[1], r[6]) and torch.allclose(r[3], r[6])


def test_rkv_pooled_never_keeps_padding_and_rkv_is_unchanged():
    from kava.distill.compression import get_selector, rkv_scores

    torch.manual_seed(0)
    keys, queries = torch.randn(2, 2, 10, 4), torch.randn(2, 4, 3, 4)
    cot = torch.zeros(2, 10, dtype=torch.bool)
    cot[0, 1:4] = True
    cot[1, 2:9] = True
    ans = torch.ones(2, 3, dtype=torch.bool)
    idx, valid = get_selector("rkv_pooled", 0.1).select(SelectRequest(keys, None, queries, cot, ans, 5))
    assert valid[0].sum(-1).tolist() == [3, 3] and valid[1].all()
    assert all(bool(cot[i, idx[i][valid[i]]].all()) for i in range(2))
    sel = get_selector("rkv", 0.1)
    assert type(sel).__name__ == "RKVSelector" and sel.name == "rkv"
    torch.testing.assert_close(
        sel.score(SelectRequest(keys, None, queries, cot, ans, 5)), rkv_scores(keys, queries, cot, ans, 0.1)
    )

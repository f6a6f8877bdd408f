"""Teachers of another shape (layer/head alignment) and multi-teacher fusion, on hand-made tensors."""

import math

import pytest
import torch

from kava import losses
from kava.distill.align import KVShape, TeacherAligner, concat_windows, layer_weights
from kava.distill.fusion import Fusion, slot_distance, slot_valid


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- layer_weights / concat_windows -----------------------------------------------------------


def test_interp_equal_depth_is_identity():
    assert torch.equal(layer_weights(4, 4, "interp"), torch.eye(4))


def test_interp_picks_exact_teacher_layers():
    w = layer_weights(7, 4, "interp")
    assert torch.equal(w, torch.eye(7)[[0, 2, 4, 6]])


def test_interp_splits_between_layers():
    w = layer_weights(4, 3, "interp")
    assert torch.allclose(w, torch.tensor([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0, 1.0]]))


def test_mean_pairs_up_layers():
    w = layer_weights(8, 4, "mean")
    expected = torch.zeros(4, 8)
    for l in range(4):
        expected[l, 2 * l : 2 * l + 2] = 0.5
    assert torch.equal(w, expected)


def test_mean_fills_empty_buckets_with_one_teacher_layer():
    w = layer_weights(2, 4, "mean")
    assert torch.equal(w, torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]]))
    # 2 -> 5: student 3 is empty and sits at depth 0.75, so it rounds up to teacher layer 1.
    assert layer_weights(2, 5, "mean").argmax(1).tolist() == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("kind", ["interp", "mean", "weighted"])
@pytest.mark.parametrize("lt,ls", [(8, 4), (4, 8), (5, 3), (3, 1), (1, 3), (30, 16)])
def test_layer_weights_rows_sum_to_one(kind, lt, ls):
    w = layer_weights(lt, ls, kind)
    assert w.shape == (ls, lt) and (w >= 0).all()
    assert torch.allclose(w.sum(1), torch.ones(ls))


def test_concat_windows():
    assert concat_windows(8, 4).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert concat_windows(5, 1).tolist() == [[0, 1, 2, 3, 4]]
    assert concat_windows(2, 3).tolist() == [[0], [1], [1]]


# --- TeacherAligner ---------------------------------------------------------------------------

B, M = 2, 3
STUDENT = KVShape(layers=4, kv_heads=2, head_dim=8, hidden=32)


def _teacher_cache(shape: KVShape, seed=0):
    k = _rand(shape.layers, B, shape.kv_heads, M, shape.head_dim, seed=seed)
    v = _rand(shape.layers, B, shape.kv_heads, M, shape.head_dim, seed=seed + 1)
    return k, v, torch.ones(shape.layers, B, shape.kv_heads, M, dtype=torch.bool)


def test_identity_path_returns_inputs():
    al = TeacherAligner(STUDENT, STUDENT, "mean")
    assert al.identity and not list(al.parameters())
    k, v, valid = _teacher_cache(STUDENT)
    h = _rand(4, B, 32)
    out = al.teacher_kv(k, v, valid)
    assert all(a is b for a, b in zip(out, (k, v, valid)))
    assert all(a is b for a, b in zip(al.student_kv(k, v), (k, v)))
    assert al.teacher_hidden(h) is h and al.student_hidden(h) is h


def test_weighted_is_not_identity_even_for_equal_shapes():
    al = TeacherAligner(STUDENT, STUDENT, "weighted")
    assert not al.identity
    k, v, _ = _teacher_cache(STUDENT)
    sk, sv = al.student_kv(k, v)  # square maps start as identity
    assert torch.allclose(sk[:, :, 0], k.permute(0, 1, 3, 2, 4).reshape(4, B, M, 16))


@pytest.mark.parametrize("aggregation", ["interp", "mean", "weighted", "concat"])
def test_shapes_for_another_teacher(aggregation):
    teacher = KVShape(layers=6, kv_heads=3, head_dim=4, hidden=24)
    al = TeacherAligner(STUDENT, teacher, aggregation)
    feat = 12 * (2 if aggregation == "concat" else 1)
    k, v, valid = _teacher_cache(teacher)
    tk, tv, tvalid = al.teacher_kv(k, v, valid)
    assert tk.shape == tv.shape == (4, B, 1, M, feat) and tvalid.shape == (4, B, 1, M) and tvalid.all()
    sk, sv = al.student_kv(_rand(4, B, 2, M, 8), _rand(4, B, 2, M, 8, seed=1))
    assert sk.shape == sv.shape == (4, B, 1, M, feat)
    assert al.teacher_hidden(_rand(6, B, 24)).shape == (4, B, 24)
    assert al.student_hidden(_rand(4, B, 32)).shape == (4, B, 24)


def test_student_kv_starts_as_identity_when_flat_sizes_match():
    teacher = KVShape(layers=7, kv_heads=1, head_dim=16, hidden=32)  # 1*16 == 2*8
    al = TeacherAligner(STUDENT, teacher)
    k, v = _rand(4, B, 2, M, 8), _rand(4, B, 2, M, 8, seed=1)
    sk, sv = al.student_kv(k, v)
    assert torch.equal(sk[:, :, 0], k.permute(0, 1, 3, 2, 4).reshape(4, B, M, 16))
    assert torch.equal(sv[:, :, 0], v.permute(0, 1, 3, 2, 4).reshape(4, B, M, 16))
    h = _rand(4, B, 32)
    assert torch.equal(al.student_hidden(h), h)


def test_teacher_kv_mixes_layers_and_flattens_heads():
    teacher = KVShape(layers=8, kv_heads=2, head_dim=3, hidden=8)
    k, v, valid = _teacher_cache(teacher)
    tk, _, _ = TeacherAligner(STUDENT, teacher, "mean").teacher_kv(k, v, valid)
    flat = k.permute(0, 1, 3, 2, 4).reshape(8, B, M, 6)
    assert torch.allclose(tk[1, :, 0], (flat[2] + flat[3]) / 2)
    ck, _, _ = TeacherAligner(STUDENT, teacher, "concat").teacher_kv(k, v, valid)
    assert torch.equal(ck[1, :, 0], torch.cat([flat[2], flat[3]], -1))


@pytest.mark.parametrize("aggregation", ["interp", "weighted", "concat"])
def test_slot_invalid_in_one_head_of_a_used_layer_invalidates_student_slot(aggregation):
    teacher = KVShape(layers=8, kv_heads=2, head_dim=4, hidden=8)
    k, v, valid = _teacher_cache(teacher)
    valid[2, 1, 1, 2] = False  # layer 2, example 1, head 1, slot 2
    _, _, out = TeacherAligner(STUDENT, teacher, aggregation).teacher_kv(k, v, valid)
    bad = torch.zeros(4, B, M, dtype=torch.bool)
    if aggregation == "weighted":
        bad[:, 1, 2] = True  # softmax gives every teacher layer some weight
    else:
        bad[1, 1, 2] = True  # interp: student 1 sits at depth 7/3 (layers 2, 3); concat: window [2, 3]
    assert torch.equal(out[:, :, 0], ~bad)


def test_weighted_logits_get_a_gradient():
    teacher = KVShape(layers=6, kv_heads=1, head_dim=16, hidden=32)
    al = TeacherAligner(STUDENT, teacher, "weighted")
    k, v, valid = _teacher_cache(teacher)
    tk, tv, tvalid = al.teacher_kv(k, v, valid)
    sk, sv = al.student_kv(_rand(4, B, 2, M, 8), _rand(4, B, 2, M, 8, seed=1))
    slot_distance(tk, tv, sk, sv, tvalid).sum().backward()  # kv_loss would detach the teacher side
    assert al.layer_logits.grad is not None and al.layer_logits.grad.abs().sum() > 0
    assert al.k_weight.grad.abs().sum() > 0 and not k.requires_grad


def test_mqa_teacher_against_gqa_student():
    teacher = KVShape(layers=3, kv_heads=1, head_dim=16, hidden=48)
    al = TeacherAligner(STUDENT, teacher)
    tk, tv, tvalid = al.teacher_kv(*_teacher_cache(teacher))
    sk, sv = al.student_kv(_rand(4, B, 2, M, 8), _rand(4, B, 2, M, 8, seed=1))
    assert tk.shape == sk.shape == (4, B, 1, M, 16)
    assert torch.isfinite(losses.kv_loss(tk, tv, sk, sv, tvalid, "cosine"))


def test_student_maps_learn_a_linear_target():
    torch.manual_seed(0)
    teacher = KVShape(layers=2, kv_heads=3, head_dim=4, hidden=8)
    al = TeacherAligner(STUDENT, teacher)
    x = _rand(4, 16, 2, M, 8)
    flat = x.permute(0, 1, 3, 2, 4).reshape(4, 16, M, 16)
    target = (flat @ _rand(16, 12, seed=5) * 0.3).unsqueeze(2)
    opt = torch.optim.Adam(al.parameters(), lr=0.05)

    def dist():
        sk, sv = al.student_kv(x, x)
        return ((sk - target).square().mean() + (sv - target).square().mean()) / 2

    start = dist().item()
    for _ in range(100):
        opt.zero_grad()
        d = dist()
        d.backward()
        opt.step()
    assert dist().item() < 0.05 * start


# --- slot_distance ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", losses.KV_LOSSES)
@pytest.mark.parametrize("layer_std", [False, True])
def test_slot_distance_matches_kv_loss(kind, layer_std):
    tk, tv, sk, sv = (_rand(3, B, 2, 4, 5, seed=s) for s in range(4))
    valid = torch.ones(3, B, 2, 4, dtype=torch.bool)
    scale = losses.kv_scale(tk, tv, valid) if layer_std else None
    d = slot_distance(tk, tv, sk, sv, valid, kind, scale)
    w = slot_valid(valid).float()
    assert d.shape == (B, 4)
    expected = losses.kv_loss(tk, tv, sk, sv, valid, kind, scale)
    assert ((d * w).sum() / w.sum()).item() == pytest.approx(expected.item(), rel=1e-5)


def test_slot_distance_ignores_masked_entries():
    tk, tv = torch.zeros(2, 1, 2, 3, 4), torch.zeros(2, 1, 2, 3, 4)
    sk, sv = torch.ones_like(tk), torch.zeros_like(tv)
    valid = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    sk[0, 0, 1, 1] = 100.0  # a masked entry of slot 1
    valid[0, 0, 1, 1] = False
    valid[:, 0, :, 2] = False  # slot 2 valid nowhere
    d = slot_distance(tk, tv, sk, sv, valid, "l1")
    assert torch.allclose(d, torch.tensor([[0.5, 0.5, 0.0]]))
    assert slot_valid(valid).tolist() == [[True, True, False]]


# --- Fusion -----------------------------------------------------------------------------------


def _fusion_inputs(k=2):
    d = torch.stack([torch.full((B, M), float(i + 1)) for i in range(k)])  # teacher i: distance i+1
    return d, torch.zeros(k, B, M), torch.ones(k, B, M, dtype=torch.bool)


def test_fixed_weights():
    d, s, valid = _fusion_inputs()
    loss, w, metrics = Fusion("fixed", 2, weights=[3.0, 1.0])(d, s, valid)
    assert torch.allclose(w[0], torch.full((B, M), 0.75)) and torch.allclose(w[1], torch.full((B, M), 0.25))
    assert loss.item() == pytest.approx(0.75 * 1 + 0.25 * 2)
    assert float(metrics["w0"]) == pytest.approx(0.75)


def test_similarity_picks_the_more_similar_teacher():
    d, s, valid = _fusion_inputs()
    s[0], s[1, 0] = 0.2, 0.9  # teacher 1 more similar on example 0 only
    _, w, _ = Fusion("similarity", 2, temperature=1e-3)(d, s, valid)
    assert torch.allclose(w[1, 0], torch.ones(M)) and torch.allclose(w[0, 1], torch.ones(M))
    _, w_warm, _ = Fusion("similarity", 2, temperature=10.0)(d, s, valid)
    assert (w_warm[1, 0] < 0.6).all()


@pytest.mark.parametrize("router", ["mlp", "gate", "attention"])
def test_routers_give_distributions_and_learn(router):
    torch.manual_seed(0)
    d, s, valid = _fusion_inputs(3)
    state = _rand(B, M, 10, seed=1).requires_grad_()
    summaries = [_rand(B, M, f, seed=2 + f) for f in (4, 6, 8)]
    fusion = Fusion("router", 3, router=router, student_dim=10, teacher_dims=[4, 6, 8], hidden=16)
    loss, w, metrics = fusion(d, s, valid, state, summaries)
    assert torch.allclose(w.sum(0), torch.ones(B, M)) and (w > 0).all()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.parameters())
    assert state.grad is None  # the router does not train the student
    assert set(metrics) == {"w0", "w1", "w2", "router_entropy"}


def test_entropy_regulariser():
    d, s, valid = _fusion_inputs()
    state = torch.zeros(B, M, 4)
    fusion = Fusion("router", 2, router="gate", student_dim=4, entropy_weight=1.0)
    with torch.no_grad():
        fusion.net.weight.zero_()
        fusion.net.bias.zero_()
    loss, _, metrics = fusion(d, s, valid, state)
    assert loss.item() == pytest.approx(1.5)  # uniform: mean distance, no penalty
    assert float(metrics["router_entropy"]) == pytest.approx(math.log(2))
    with torch.no_grad():
        fusion.net.bias.copy_(torch.tensor([2.0, 0.0]))
    loss, w, _ = fusion(d, s, valid, state)
    p = w[0, 0, 0].item()
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert loss.item() == pytest.approx(p + 2 * (1 - p) + math.log(2) - entropy, rel=1e-5)
    assert math.log(2) - entropy > 0.1


def test_missing_slot_gets_zero_weight():
    d, s, valid = _fusion_inputs()
    valid[0, 0, 1] = False  # teacher 0 lacks example 0 slot 1
    valid[:, 1, 2] = False  # no teacher has example 1 slot 2
    d[:, 1, 2] = 1000.0
    loss, w, _ = Fusion("fixed", 2)(d, s, valid)
    assert w[0, 0, 1] == 0 and w[1, 0, 1] == 1 and (w[:, 1, 2] == 0).all()
    # 5 usable slots: four at 1.5, one at 2 (teacher 1 alone).
    assert loss.item() == pytest.approx((4 * 1.5 + 2.0) / 5)


@pytest.mark.parametrize("kind", ["fixed", "similarity", "router"])
def test_single_teacher_is_the_plain_mean(kind):
    d = _rand(1, B, M).abs()
    valid = torch.ones(1, B, M, dtype=torch.bool)
    valid[0, 1, 0] = False
    fusion = Fusion(kind, 1, student_dim=4)
    loss, w, metrics = fusion(d, torch.zeros(1, B, M), valid, torch.zeros(B, M, 4))
    assert torch.equal(w, valid.float())
    assert loss.item() == pytest.approx(d[valid].mean().item())
    assert float(metrics["w0"]) == pytest.approx(1.0)

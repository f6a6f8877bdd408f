"""Loss functions on analytic cases."""

import pytest
import torch

from kava import losses


def _kv(seed=0, shape=(2, 3, 2, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@pytest.mark.parametrize("kind", losses.KV_LOSSES)
@pytest.mark.parametrize("layer_std", [False, True])
def test_kv_loss_is_zero_for_identical_inputs(kind, layer_std):
    k, v = _kv()
    valid = torch.ones(k.shape[:-1], dtype=torch.bool)
    scale = losses.kv_scale(k, v, valid) if layer_std else None
    assert losses.kv_loss(k, v, k.clone(), v.clone(), valid, kind, scale).item() == pytest.approx(0.0, abs=1e-5)


def test_kv_loss_l1_and_mse_values():
    k = torch.zeros(1, 1, 1, 2, 4)
    v = torch.zeros_like(k)
    valid = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    sk = torch.full_like(k, 2.0)
    # K differs by 2 everywhere, V not at all: (2 + 0) / 2 = 1 for l1, (4 + 0) / 2 = 2 for mse.
    assert losses.kv_loss(k, v, sk, v, valid, "l1").item() == pytest.approx(1.0)
    assert losses.kv_loss(k, v, sk, v, valid, "mse").item() == pytest.approx(2.0)
    # smooth_l1 with beta 1: |x| - 0.5 = 1.5
    assert losses.kv_loss(k, v, sk, v, valid, "smooth_l1").item() == pytest.approx(0.75)


def test_kv_loss_ignores_masked_slots():
    k, v = _kv(1)
    sk, sv = k.clone(), v.clone()
    valid = torch.ones(k.shape[:-1], dtype=torch.bool)
    valid[..., -1] = False
    sk[..., -1, :] += 100.0
    sv[..., -1, :] -= 100.0
    for kind in losses.KV_LOSSES:
        assert losses.kv_loss(k, v, sk, sv, valid, kind).item() == pytest.approx(0.0, abs=1e-5)
    assert losses.kv_loss(k, v, sk, sv, torch.ones_like(valid), "l1").item() > 1.0


def test_kv_loss_no_valid_slot_is_zero_with_gradient():
    k, v = _kv(2)
    sk = k.clone().requires_grad_(True)
    out = losses.kv_loss(k, v, sk, v, torch.zeros(k.shape[:-1], dtype=torch.bool), "l1")
    out.backward()
    assert out.item() == 0.0 and sk.grad is not None


def test_layer_std_normalisation_makes_the_loss_scale_free():
    k, v = _kv(3)
    sk, sv = k + 0.3, v - 0.2
    valid = torch.ones(k.shape[:-1], dtype=torch.bool)
    a = losses.kv_loss(k, v, sk, sv, valid, "l1", losses.kv_scale(k, v, valid))
    b = losses.kv_loss(10 * k, 10 * v, 10 * sk, 10 * sv, valid, "l1", losses.kv_scale(10 * k, 10 * v, valid))
    c = losses.kv_loss(10 * k, 10 * v, 10 * sk, 10 * sv, valid, "l1")
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert c.item() == pytest.approx(10 * losses.kv_loss(k, v, sk, sv, valid, "l1").item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_kv_loss_with_an_explicit_scale_is_the_hand_formula(kind):
    # Layers 0 and 1; the scale is given, never read from the target: K divided by 2 and 4, V by 1 and 0.5.
    k, v = torch.zeros(2, 1, 1, 2, 3), torch.zeros(2, 1, 1, 2, 3)
    sk, sv = torch.ones_like(k), torch.ones_like(v)
    sk[1], sv[1] = 2.0, 3.0
    valid = torch.ones(2, 1, 1, 2, dtype=torch.bool)
    valid[1, 0, 0, 1] = False  # layer 1 counts one slot only
    scale = torch.tensor([[2.0, 4.0], [1.0, 0.5]])
    p = 1 if kind == "l1" else 2
    # Per valid entry: (|sk/s_k|^p + |sv/s_v|^p) / 2; layer 0 has 2 entries, layer 1 has 1.
    layer0 = ((1 / 2) ** p + (1 / 1) ** p) / 2
    layer1 = ((2 / 4) ** p + (3 / 0.5) ** p) / 2
    expected = (2 * layer0 + layer1) / 3
    got = losses.kv_loss(k, v, sk, sv, valid, kind, scale)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # The target's own std is 0 here: a normaliser read from the target would not give this value.
    assert losses.kv_scale(k, v, valid).max().item() < 1e-5
    assert losses.kv_slot_distance(k, v, sk, sv, valid, kind, scale).shape == (1, 2)
    with pytest.raises(ValueError, match="one value per layer"):
        losses.kv_loss(k, v, sk, sv, valid, kind, scale[:, :1])


def test_kv_scale_is_the_per_layer_std_of_k_and_v_over_the_mask():
    k, v = _kv(6, shape=(3, 2, 2, 5, 4))
    cot = torch.tensor([[True, True, True, False, False], [False, True, True, True, True]])
    got = losses.kv_scale(k, v, cot[None, :, None, :])
    assert got.shape == (2, 3)
    for layer in range(3):
        for row, x in enumerate((k, v)):
            ref = torch.cat([x[layer, b][:, cot[b]].reshape(-1) for b in range(2)]).std(unbiased=False)
            assert got[row, layer].item() == pytest.approx(ref.item(), rel=1e-5)


def test_masked_layer_std_matches_torch_std_per_layer():
    x = torch.randn(3, 2, 5, 4)
    mask = torch.ones(3, 2, 5, dtype=torch.bool)
    mask[:, :, -2:] = False
    got = losses.masked_layer_std(x, mask)
    for layer in range(3):
        ref = x[layer, :, :3].reshape(-1).std(unbiased=False)
        assert got[layer].item() == pytest.approx(ref.item(), rel=1e-5)


def test_kv_loss_gradient_flows_to_student_only():
    k, v = _kv(4)
    tk, tv = k.clone().requires_grad_(True), v.clone().requires_grad_(True)
    sk, sv = (k + 1).requires_grad_(True), (v + 1).requires_grad_(True)
    valid = torch.ones(k.shape[:-1], dtype=torch.bool)
    losses.kv_loss(tk, tv, sk, sv, valid, "l1", losses.kv_scale(tk, tv, valid)).backward()
    assert tk.grad is None and tv.grad is None
    assert sk.grad.abs().sum() > 0 and sv.grad.abs().sum() > 0


def test_cosine_variant_is_scale_aware():
    k, v = _kv(5)
    valid = torch.ones(k.shape[:-1], dtype=torch.bool)
    # Same direction, double length: cosine term 0, magnitude term |2|k| - |k|| / |k| = 1 (for K), 0 for V.
    out = losses.kv_loss(k, v, 2 * k, v, valid, "cosine")
    assert out.item() == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("kind", losses.CODI_LOSSES)
def test_codi_loss_zero_when_equal_and_symmetric_for_l1(kind):
    t = torch.randn(4, 3, 8)
    s = torch.randn(4, 3, 8)
    assert losses.codi_loss(t, t.clone(), kind).item() == pytest.approx(0.0, abs=1e-6)
    if kind == "l1":
        # Normalised by the *teacher's* std, so swap only keeps the value when stds agree.
        s_same_std = s * (
            t.std(dim=(1, 2), unbiased=False, keepdim=True) / s.std(dim=(1, 2), unbiased=False, keepdim=True)
        )
        a = losses.codi_loss(t, s_same_std, kind).item()
        b = losses.codi_loss(s_same_std, t, kind).item()
        assert a == pytest.approx(b, rel=1e-4)


def test_codi_loss_divides_each_layer_by_teacher_std():
    t = torch.zeros(2, 2, 4)
    t[0] = torch.tensor([[1.0, -1, 1, -1], [1, -1, 1, -1]])  # std 1
    t[1] = 10 * t[0]  # std 10
    s = t.clone()
    s[0] += 1.0
    s[1] += 10.0
    # layer 0: |1| / 1 = 1 ; layer 1: |10| / 10 = 1 -> mean 1
    assert losses.codi_loss(t, s, "l1").item() == pytest.approx(1.0, rel=1e-5)


def test_token_ce_ignores_unlabelled_and_matches_cross_entropy():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, -100, -100, 3], [-100, -100, -100, 4, 0]])
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 7), labels.view(-1), ignore_index=-100)
    assert losses.token_ce(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    assert losses.token_ce(logits, torch.full_like(labels, -100)).item() == 0.0


def test_unknown_loss_kind_is_an_error():
    k, v = _kv()
    with pytest.raises(ValueError, match="unknown KV loss"):
        losses.kv_loss(k, v, k, v, torch.ones(k.shape[:-1], dtype=torch.bool), "l3")


def test_kv_scale_from_summed_moments_is_the_masked_std():
    from kava.losses import kv_moments, kv_scale, masked_layer_std, scale_from_moments

    torch.manual_seed(0)
    k, v = torch.randn(3, 4, 2, 5, 8) * 3 + 1, torch.randn(3, 4, 2, 5, 8)
    mask = torch.rand(1, 4, 1, 5) > 0.3
    m = mask.expand(k.shape[:-1])
    want = torch.stack([masked_layer_std(k, m), masked_layer_std(v, m)])
    torch.testing.assert_close(kv_scale(k, v, mask), want, rtol=1e-5, atol=1e-6)
    # Examples' moments computed apart (as a cache keeps them) and summed give the batch's std.
    parts = torch.cat([kv_moments(k[:, i : i + 1], v[:, i : i + 1], mask[:, i : i + 1]) for i in range(4)])
    torch.testing.assert_close(scale_from_moments(parts.sum(0)), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(scale_from_moments(parts[:2].sum(0)), want)  # half the batch is another std


@pytest.mark.parametrize("full_mask", [False, True])
def test_kv_moments_are_each_examples_count_sum_and_square_sum_per_layer(full_mask):
    torch.manual_seed(1)
    k, v = torch.randn(3, 4, 2, 5, 8) * 2 + 1, torch.randn(3, 4, 2, 5, 8)
    shape = (3, 4, 2, 5) if full_mask else (1, 4, 1, 5)
    mask = torch.rand(shape) > 0.4
    mask[:, 2] = False  # an example with nothing kept has zero moments
    got = losses.kv_moments(k, v, mask)  # [B, 2, L, 3]
    assert got.shape == (4, 2, 3, 3) and got.dtype == torch.float64
    m = mask.expand(k.shape[:-1])
    for b in range(4):
        for j, x in enumerate((k, v)):
            for layer in range(3):
                xs = x[layer, b][m[layer, b]].double()  # [kept, d]
                want = torch.stack([torch.tensor(float(xs.numel()), dtype=torch.float64), xs.sum(), (xs * xs).sum()])
                torch.testing.assert_close(got[b, j, layer], want)
    assert (got[2] == 0).all() and (got[0, :, :, 0] > 0).all()


def test_kv_moments_count_each_tensors_own_head_size():
    """Keys and values may have different head sizes (e.g. an MLA-style cache): each count is its own."""
    k, v = torch.ones(2, 3, 1, 4, 8), torch.ones(2, 3, 1, 4, 5)
    mask = torch.tensor([[True, True, False, False]] * 3)[None, :, None, :]
    got = losses.kv_moments(k, v, mask)
    assert (got[:, 0, :, 0] == 2 * 8).all() and (got[:, 1, :, 0] == 2 * 5).all()
    assert (got[:, 0, :, 1] == 16).all() and (got[:, 1, :, 2] == 10).all()

"""The peers' ports in benchmarks/bench_peers.py: finite losses with gradients on the backbone,
the distillation terms' analytic values, the same sequences as kava's (the CEs a port shares
with kava's step equal kava's), and one timed round of every arm."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_peers as bp  # noqa: E402
from kava.distill import Objective  # noqa: E402

MICRO = bp.Backbone(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
SHAPE = bp.Shape(batch=3, cot=8, latents=3, iterations=2)
CONFIG = str(ROOT / "configs/tiny/kava.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the benchmark runs (two threads on a shared CPU spin in OpenMP)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(*overrides, arm="kava"):
    cfg = bp.kava_config(CONFIG, SHAPE, overrides, arm)
    model = bp.build_model(cfg, MICRO, torch.device("cpu"), torch.float32)
    encs = bp.make_examples(model, cfg, SHAPE.batch, question=5, cot=SHAPE.cot, step_tokens=3, answer=2)
    objective = Objective(model, cfg).train()
    batch = objective.make_batch(encs, 0)
    return model, objective, batch["teacher"], batch["student"]


@pytest.mark.parametrize("peer", ["codi", "codi_1pass", "pccot"])
def test_port_loss_is_finite_and_trains_the_backbone(peer):
    model, _, tb, sb = _setup()
    if peer == "pccot":
        out = bp.pccot_step(model, tb, sb, SHAPE.latents, SHAPE.iterations)
    else:
        out = bp.codi_step(model, tb, sb, SHAPE.latents, teacher_passes=1 if peer == "codi_1pass" else 2)
    for term in (out.loss, out.ce_student, out.ce_teacher, out.distill):
        assert torch.isfinite(term) and term.ndim == 0
    assert out.distill > 0  # random weights: the student's states are not the teacher's
    out.loss.backward()
    layer = model.decoder.layers[0]
    for w in (
        layer.self_attn.q_proj.weight,
        layer.mlp.down_proj.weight,
        model.base_model.get_input_embeddings().weight,
    ):
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    projection = model.projection.net[1].weight.grad
    if peer == "pccot":  # PCCoT's default: no projection
        assert projection is None
    else:
        assert projection is not None and projection.abs().sum() > 0


def test_codi_distill_is_zero_for_equal_states_and_scaled_by_the_teacher_std():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 8, generator=g) * (j + 1) for j in range(3)]
    assert bp.codi_distill([t.clone() for t in teacher], teacher) == 0.0
    # A constant offset of 0.5 (< 1: smooth L1's quadratic part) costs 0.5 * 0.5^2 = 0.125 per
    # element, divided by each entry's std, averaged over the entries.
    got = bp.codi_distill([t + 0.5 for t in teacher], teacher)
    want = sum(0.125 / t.std() for t in teacher) / 3
    torch.testing.assert_close(got, want)
    l2 = bp.codi_distill([t + 0.5 for t in teacher], teacher, kind="l2")
    torch.testing.assert_close(l2, sum(0.25 / t.std() ** 2 for t in teacher) / 3)
    with pytest.raises(ValueError, match="kind"):
        bp.codi_distill(teacher, teacher, kind="l1")


def test_pccot_kd_is_zero_for_equal_states_and_normalised_per_layer():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(3, 4, 8, generator=g) * torch.tensor([1.0, 10.0, 100.0])[:, None, None]
    assert bp.pccot_kd(teacher.clone(), teacher) == 0.0
    per_layer = bp.pccot_kd(teacher + 0.5, teacher)
    torch.testing.assert_close(per_layer, torch.stack([0.125 / teacher[i].std() for i in range(3)]).mean())
    torch.testing.assert_close(bp.pccot_kd(teacher + 0.5, teacher, layerwise_std=False), 0.125 / teacher.std())


def test_codi_port_feeds_what_kava_sequential_feeds():
    """CODI's student (Q <bot>, M projected latents one per pass, then <eot> A) is kava's
    sequential scheme with one more pass: the same latents, so the same student CE; its teacher
    CE over every position equals kava's head-at-labelled-positions CE."""
    model, _, tb, sb = _setup(arm="kava_codi")
    with torch.no_grad():
        out = bp.codi_step(model, tb, sb, SHAPE.latents)
        codi_obj = Objective(model, bp.kava_config(CONFIG, SHAPE, (), "kava_codi")).train()
        kava_student = codi_obj.student_pass(sb).ce
        kava_teacher = codi_obj.ce_loss(tb)
    torch.testing.assert_close(out.ce_student, kava_student)
    torch.testing.assert_close(out.ce_teacher, kava_teacher)


def test_pccot_port_feeds_what_kava_jacobi_feeds():
    """PCCoT's T iterations from the question's cache, then the answer from the last one's cache,
    are kava's Jacobi scheme (T passes with the final one) without the projection: the same
    student CE, and the same teacher CE."""
    model, objective, tb, sb = _setup("latent.projection=false")
    with torch.no_grad():
        out = bp.pccot_step(model, tb, sb, SHAPE.latents, SHAPE.iterations)
        kava_student = objective.student_pass(sb).ce
        kava_teacher = objective.ce_loss(tb)
    torch.testing.assert_close(out.ce_student, kava_student)
    torch.testing.assert_close(out.ce_teacher, kava_teacher)
    # One iteration fewer changes the latents, so the CE (a check that can fail).
    with torch.no_grad():
        fewer = bp.pccot_step(model, tb, sb, SHAPE.latents, SHAPE.iterations - 1)
    assert not torch.allclose(fewer.ce_student, kava_student)


def test_median_ratio_and_its_interval():
    med, lo, hi = bp.median_ratio([2.0, 3.0, 4.0, 5.0, 9.0], [2.0, 2.0, 2.0, 2.0, 2.0])
    assert med == 2.0 and lo <= med <= hi and lo >= 1.0 and hi <= 4.5
    assert bp.median_ratio([1.0] * 4, [2.0] * 4) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError):
        bp.median_ratio([1.0], [1.0, 2.0])


def test_one_round_of_every_arm_prints_a_table(monkeypatch):
    monkeypatch.setitem(bp.MODELS, "tiny", MICRO)
    args = bp.parse_args(
        [
            "--shapes",
            "3x8x3x2",
            "--arms",
            ",".join(bp.ARMS),
            "--iters",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--question-tokens",
            "5",
            "--answer-tokens",
            "2",
            "--device",
            "cpu",
        ]
    )
    r = bp.run(args)
    (res,) = r["results"]
    assert set(res["ratios"]) == {f"{k}/{p}" for k in ("kava", "kava_codi") for p in ("codi", "codi_1pass", "pccot")}
    for q in res["ratios"].values():
        assert 0 < q["low"] <= q["median"] <= q["high"]
    # Positions fed per example and passes: teacher N = Q + C + A, student prefix P = Q + 1,
    # suffix S = 1 + A (A: answer prefix + answer), M = 3, T = 2.
    model, _, tb, sb = _setup()
    n, p, s = tb["input_ids"].shape[1], sb["prefix_ids"].shape[1], sb["suffix_ids"].shape[1]
    m, t = SHAPE.latents, SHAPE.iterations
    assert (n, p) == (5 + 8 + s - 1, 6)
    want = {
        "kava": (n + p + (t + 1) * m + s, 1 + t + 1),  # teacher; first pass, T - 1 iterations, final pass
        "kava_codi": (n + p + m + s, 1 + m + 1),  # teacher; first pass, M - 1 latents, final pass
        "codi": (2 * n + p + m + s, 2 + 1 + m + 1),  # two teacher passes; question, M latents, answer
        "codi_1pass": (n + p + m + s, 1 + 1 + m + 1),
        "pccot": (n + p + (t + 1) * m + s, 1 + 1 + t + 1),  # teacher; first pass, T iterations, answer
    }
    got = {a: (res["arms"][a]["positions_per_example"], res["arms"][a]["passes"]) for a in bp.ARMS}
    assert got == want
    assert all(res["arms"][a]["ms_per_example"] > 0 for a in bp.ARMS)
    text = bp.report(r)
    assert "| kava/codi | kava/codi_1pass | kava/pccot | kava_codi/codi |" in text
    assert len([line for line in text.splitlines() if line.startswith("| tiny | 3 | 8 | 3 | 2 |")]) == 1


def test_profile_reports_each_arms_self_time_and_matrix_share(monkeypatch):
    monkeypatch.setitem(bp.MODELS, "tiny", MICRO)
    base = "--shapes 3x8x3x2 --arms kava,codi --iters 1 --warmup 0 --question-tokens 5 --answer-tokens 2 --device cpu"
    r = bp.run(bp.parse_args(f"{base} --profile 3".split()))
    prof = r["results"][0]["profile"]
    assert set(prof) == {"kava", "codi"}
    for p in prof.values():
        assert p["self_cpu_ms"] > 0 and 0 < p["matmul_share"] < 1 and len(p["top"]) == 3
        costs = [o["self_cpu_ms"] for o in p["top"]]
        assert costs == sorted(costs, reverse=True) and sum(costs) <= p["self_cpu_ms"] + 1e-6
    assert "profile 3x8x3x2 kava:" in bp.report(r) and "matrix products" in bp.report(r)
    assert "profile" not in bp.run(bp.parse_args(base.split()))["results"][0]  # off by default

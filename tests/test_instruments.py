"""The per-run instruments: logit lens, KV alignment, what each selector keeps."""

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_config
from kava.data.loaders import load_data
from kava.data.sequences import IGNORE, TOKEN_TYPES, TextEncoder
from kava.distill import instruments
from kava.distill.objective import Objective
from kava.model.checkpoints import build_model


def test_logit_lens_scores_each_slot_against_its_step():
    vocab = 6
    # Three examples, two latent slots; the "LM head" is the identity, so producer j decodes to its argmax.
    decoded = torch.tensor([[1, 2], [1, 5], [3, 1]])
    producers = torch.nn.functional.one_hot(decoded, vocab).float()
    targets = torch.tensor([[1, 2], [1, 2], [4, IGNORE]])
    model = SimpleNamespace(lm_head=torch.nn.Identity(), tokenizer=SimpleNamespace(decode=lambda ids: f"t{ids[0]}"))
    passes = {"student": SimpleNamespace(state=SimpleNamespace(producers=producers)), "sb": {"latent_targets": targets}}
    lens = instruments.logit_lens(SimpleNamespace(model=model), passes)
    s0, s1 = lens["slots"]
    assert s0["n"] == 3 and s0["aligned"] == pytest.approx(2 / 3, abs=1e-4)  # 1 = 1, 1 = 1, 3 != 4
    assert s1["n"] == 2 and s1["aligned"] == pytest.approx(0.5)  # 2 = 2, 5 != 2 (example 3 has no step 2)
    assert s1["any_result"] == pytest.approx(1 / 3, abs=1e-4)  # 2 in {1, 2}; 5 not in {1, 2}; 1 not in {4}
    assert s0["top"][0] == ["t1", pytest.approx(2 / 3, abs=1e-4)]
    assert lens["aligned_mean"] == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-4)


@pytest.fixture
def setup():
    cfg = tiny_config(loss={"compression": "rkv"}, data={"train": "synthetic-products", "eval": "synthetic-products"})
    torch.manual_seed(0)
    model = build_model(cfg)
    obj = Objective(model, cfg)
    enc = TextEncoder(model.tokenizer, cfg.data)
    return obj, [enc.encode(e) for e in load_data(cfg, "eval")[:8]]


def test_kv_alignment_of_a_student_that_holds_its_own_targets(setup):
    obj, encs = setup
    with torch.no_grad():
        passes = instruments._passes(obj, encs)
        target = obj.teacher_targets(
            passes["teacher"], passes["tb"], None, passes["m"], selector=instruments.RKVSelector(lam=0.1)
        )
        passes["keys"], passes["values"] = target.keys.clone(), target.values.clone()
        a = instruments.kv_alignment(obj, passes)
    assert a["own"] == 0 and a["neighbour"] > 0 and a["slot_mean"] > 0
    assert a["own_below_neighbour"] == 1.0 and a["gap"] == a["neighbour"] and a["own_below_slot_mean"] == 1.0
    # A student holding its neighbour's targets is closer to the neighbour's.
    with torch.no_grad():
        passes["keys"], passes["values"] = target.keys.roll(1, 1), target.values.roll(1, 1)
        b = instruments.kv_alignment(obj, passes)
    assert b["neighbour"] == 0 and b["own_below_neighbour"] == 0.0 and b["gap"] < 0


def test_selector_keeps_known_shares(setup):
    obj, encs = setup
    with torch.no_grad():
        keeps = instruments.selector_keeps(obj, instruments._passes(obj, encs))
    # M = 3: right-crop keeps "<<", the first digit and the operator of the first step.
    assert keeps["right_crop"]["shares"] == {
        **{t: 0.0 for t in TOKEN_TYPES},
        "open": 0.3333,
        "digit": 0.3333,
        "operator": 0.3333,
    }
    assert keeps["right_crop"]["result_recall"] == 0.0
    for name, k in keeps.items():
        if name != "_cot":
            assert sum(k["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert keeps["oracle"]["result_share"] > max(
        k["result_share"] for n, k in keeps.items() if n not in ("oracle", "_cot")
    )


def test_training_writes_the_instruments(tmp_path):
    from kava.training import train

    out = tmp_path / "run"
    cfg = tiny_config(
        data={"train": "synthetic-products", "eval": "synthetic-products"},
        train={"output_dir": str(out), "max_steps": 2, "eval_every": 1, "eval_at_end": True},
        eval={"instrument_examples": 6},
    )
    train(cfg)
    rows = [json.loads(line) for line in (out / "instruments.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["held_out"] and r["n"] == 6 for r in rows)
    assert len(rows[0]["logit_lens"]["slots"]) == cfg.latent.num_latents and rows[0]["kv_alignment"]["n"] == 6
    keeps = json.loads((out / "selector_keeps.json").read_text())
    assert keeps["run_selector"] == "rkv" and set(instruments.INDEX_SELECTORS) <= set(keeps["selectors"])
    assert keeps["step"] == 0  # before the first update: the teacher the run starts from
    off = tmp_path / "off"
    train(tiny_config(train={"output_dir": str(off), "max_steps": 1}, eval={"instruments": False}))
    assert not (off / "instruments.jsonl").exists() and not (off / "selector_keeps.json").exists()


def test_without_eval_at_end_the_run_ends_without_probes_or_instruments(tmp_path):
    """``train.eval_at_end=false`` skips all the work after the last checkpoint: the KV probe and
    the instruments at the end as well as the evaluation (an instrument row appears only at
    ``train.eval_every``)."""
    from kava.training import train

    out = tmp_path / "run"
    res = train(
        tiny_config(
            data={"train": "synthetic-products", "eval": "synthetic-products"},
            train={"output_dir": str(out), "max_steps": 2, "eval_at_end": False},
            eval={"instrument_examples": 4},
        )
    )
    assert res["state"] == "finished" and "eval" not in res
    assert not (out / "kv_cosine.json").exists() and not (out / "instruments.jsonl").exists()
    assert (out / "selector_keeps.json").is_file()  # at step 0: what the run starts from, not end-of-run work

"""Greedy decoding and evaluation outputs on a tiny model: the device-side decoder gives what
a per-row decoder gives, and every prediction is graded strictly and flexibly."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_config
from kava.answers import is_correct
from kava.data.schema import Example
from kava.data.sequences import TextEncoder
from kava.data.synthetic import generate_split
from kava.evaluation.decode import Generation, greedy, prefill
from kava.model import build_model
from kava.model.latent import positions

FREE_TOKENS = 12  # tokens decoded to choose a stop token


@torch.no_grad()
def reference_greedy(model, cache, mask, last_h, max_new: int, passes_before: int, eos: int) -> Generation:
    """Greedy decoding that reads every row's token and done flag in Python: the behaviour
    :func:`kava.evaluation.greedy` must keep, written the plain way."""
    b = last_h.shape[0]
    done = torch.zeros(b, dtype=torch.bool)
    out: list[list[int]] = [[] for _ in range(b)]
    passes = [passes_before] * b
    prompt_tokens = mask.long().sum(-1).tolist()
    for t in range(max_new):
        nxt = model.lm_head(last_h).argmax(-1)
        for i in range(b):
            if not done[i]:
                out[i].append(int(nxt[i]))
        done |= nxt == eos
        if bool(done.all()) or t == max_new - 1:
            break
        for i in range(b):
            if not done[i]:
                passes[i] += 1
        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        h = model.run(model.embed(nxt[:, None]), mask, positions(mask)[:, -1:], cache).last_hidden_state
        last_h = h[:, -1]
    kv = [prompt_tokens[i] + max(len(out[i]) - 1, 0) for i in range(b)]
    return Generation(out, passes, kv)


def first_index(row: list[int], token: int) -> int | None:
    return row.index(token) if token in row else None


def pick_stop_token(rows: list[list[int]], cap: int, steps: int = 2) -> int:
    """A token that some rows first emit before ``cap`` (at ``steps`` different steps or more)
    and others not before it: called <eos>, it makes examples finish at different times and
    others hit the cap."""
    for token in sorted({t for row in rows for t in row}):
        seen = [first_index(row, token) for row in rows]
        early = {i for i in seen if i is not None and i < cap}
        if len(early) >= steps and any(i is None or i >= cap for i in seen):
            return token
    raise AssertionError("no token stops the rows at different times; use other examples")


@pytest.fixture(scope="module")
def tiny():
    """An untrained tiny model, its config and 8 encoded synthetic test examples."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = build_model(cfg).eval()
    encoder = TextEncoder(model.tokenizer, cfg.data)
    examples = generate_split("test", 8, 0, n_ops=3)
    return model, cfg, examples, [encoder.encode(ex) for ex in examples]


@pytest.fixture
def eos_as(tiny):
    """Call another token <eos> for one test: ``eos_as(token_id)``."""
    tok = tiny[0].tokenizer
    real = tok.eos_token_id

    def set_eos(token: int) -> None:
        tok.eos_token_id = token

    yield set_eos
    tok.eos_token_id = real


def free_run(model, encs, mode, cfg) -> list[list[int]]:
    """The first FREE_TOKENS greedy tokens of each example, never stopping."""
    p = prefill(model, encs, mode, cfg)
    return reference_greedy(model, p.cache, p.mask, p.last_h, FREE_TOKENS, p.passes, eos=-1).tokens


@pytest.mark.parametrize("mode", ["cot", "student"])
@pytest.mark.parametrize("max_new", [FREE_TOKENS, 5, 1, 0])
def test_greedy_matches_the_per_row_decoder(tiny, eos_as, mode, max_new):
    model, cfg, _, encs = tiny
    rows = free_run(model, encs, mode, cfg)
    stop = pick_stop_token(rows, FREE_TOKENS)
    eos_as(stop)
    p = prefill(model, encs, mode, cfg)
    got = greedy(model, p.cache, p.mask, p.last_h, max_new, p.passes)
    p = prefill(model, encs, mode, cfg)
    want = reference_greedy(model, p.cache, p.mask, p.last_h, max_new, p.passes, eos=stop)
    assert got == want
    if max_new == FREE_TOKENS:  # the batch the test is about: finishes at different steps, some never
        finished = [len(t) for t in got.tokens if t and t[-1] == stop]
        assert len(set(finished)) >= 2
        assert any(len(t) == max_new and stop not in t for t in got.tokens)
        assert len(set(got.passes)) >= 3 and len(set(got.kv_tokens)) >= 3


def test_greedy_stops_when_every_example_is_done(tiny, eos_as):
    model, cfg, _, encs = tiny
    rows = free_run(model, encs, "cot", cfg)
    stop = pick_stop_token(rows, FREE_TOKENS)
    ending = [e for e, row in zip(encs, rows) if stop in row]  # only examples that emit it
    eos_as(stop)
    p = prefill(model, ending, "cot", cfg)
    got = greedy(model, p.cache, p.mask, p.last_h, 50, p.passes)
    p = prefill(model, ending, "cot", cfg)
    assert got == reference_greedy(model, p.cache, p.mask, p.last_h, 50, p.passes, eos=stop)
    assert all(t[-1] == stop and stop not in t[:-1] for t in got.tokens)
    assert max(map(len, got.tokens)) <= FREE_TOKENS  # stopped long before the cap of 50


def test_metrics_grade_strict_and_flexible_and_count_truncated(tiny, eos_as, tmp_path):
    """A generation capped by eval.max_new_tokens without <eos> is counted as truncated."""
    from kava.evaluation import evaluate

    model, cfg, examples, encs = tiny
    cap = 4
    rows = free_run(model, encs, "nocot", cfg)
    stop = pick_stop_token(rows, cap, steps=1)
    eos_as(stop)
    cfg = tiny_config(eval={"max_new_tokens": cap, "batch_size": 3})  # batches of 3, 3, 2
    res = evaluate(model, examples, cfg, ["nocot"], tmp_path)
    expected_truncated = sum(first_index(row, stop) is None or first_index(row, stop) >= cap for row in rows)
    assert 0 < expected_truncated < len(examples)

    metrics = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert metrics == json.loads(json.dumps(res))
    m = metrics["nocot"]
    assert {"accuracy", "accuracy_flexible", "truncated", "truncated_fraction"} <= m.keys()
    assert m["truncated"] == expected_truncated
    assert m["truncated_fraction"] == pytest.approx(expected_truncated / len(examples))

    preds = [json.loads(line) for line in (tmp_path / "predictions_nocot.jsonl").read_text().splitlines()]
    assert len(preds) == len(examples)
    for p, row in zip(preds, rows):
        at = first_index(row, stop)
        assert p["truncated"] is (at is None or at >= cap)
        assert p["generated_tokens"] == (cap if p["truncated"] else at + 1)
        assert p["prediction"].startswith(cfg.data.answer_prefix)
        assert p["correct"] is is_correct(p["prediction"], p["gold"], "strict")
        assert p["correct_flexible"] is is_correct(p["prediction"], p["gold"], "flexible")
    assert m["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    assert m["accuracy_flexible"] == pytest.approx(sum(p["correct_flexible"] for p in preds) / len(preds))


def test_headline_accuracy_is_strict(tiny, monkeypatch, tmp_path):
    """Fixed generations through evaluate(): a CoT cut off at the cap is right only flexibly."""
    import kava.evaluation.evaluator as ke

    model, cfg, _, _ = tiny
    tok = model.tokenizer
    eos = tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    texts = {
        "done": (ids("<<7*2=4>> The answer is: 4") + [eos], "4"),
        "cut": (ids("<<7*2=4>> <<4-7=7>> 3 * 8 = 4"), "4"),  # at the cap, no answer marker
        "wrong": (ids("<<7*2=4>> The answer is: 5") + [eos], "4"),
        "marked_cut": (ids("<<1+1=2>> The answer is: 2"), "2"),  # capped right after its answer
    }
    examples = [
        Example(question="7*2", steps=("<<7*2=4>>",), answer=gold, source_id=name) for name, (_, gold) in texts.items()
    ]
    gens = [toks for toks, _ in texts.values()]

    def fixed(model, encs, mode, cfg):
        return Generation(gens[: len(encs)], [1] * len(encs), [1] * len(encs))

    monkeypatch.setattr(ke, "generate", fixed)
    cfg = tiny_config(eval={"batch_size": 8})
    res = ke.evaluate(model, examples, cfg, ["cot"], tmp_path)["cot"]
    preds = {p["source_id"]: p for p in map(json.loads, (tmp_path / "predictions_cot.jsonl").read_text().splitlines())}
    assert {k: (p["correct"], p["correct_flexible"], p["truncated"]) for k, p in preds.items()} == {
        "done": (True, True, False),
        "cut": (False, True, True),
        "wrong": (False, False, False),
        "marked_cut": (True, True, True),
    }
    assert res["accuracy"] == 0.5 and res["accuracy_flexible"] == 0.75
    assert res["truncated"] == 2 and res["truncated_fraction"] == 0.5
    assert res["by_cot_steps"] == {"1": {"n": 4, "accuracy": 0.5, "accuracy_flexible": 0.75}}


def test_accuracy_by_chain_of_thought_length():
    """Per-difficulty accuracy: examples grouped by their reference CoT's number of steps."""
    from kava.evaluation.evaluator import summarise

    rows = [
        {"cot_steps": 2, "correct": True, "correct_flexible": True},
        {"cot_steps": 5, "correct": False, "correct_flexible": True},
        {"cot_steps": 5, "correct": True, "correct_flexible": True},
        {"cot_steps": 3, "correct": False, "correct_flexible": False},
        {"cot_steps": 5, "correct": False, "correct_flexible": False},
    ]
    rows = [{**r, "truncated": False, "forward_passes": 1, "generated_tokens": 1, "kv_cache_bytes": 0} for r in rows]
    by = summarise(rows, 0.0)["by_cot_steps"]
    assert list(by) == ["2", "3", "5"]
    assert by["5"] == {"n": 3, "accuracy": pytest.approx(1 / 3), "accuracy_flexible": pytest.approx(2 / 3)}
    assert by["2"]["accuracy"] == 1.0 and by["3"]["accuracy"] == 0.0
    assert sum(g["n"] for g in by.values()) == len(rows)

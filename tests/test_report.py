"""The report: collecting fabricated run folders, aggregation over seeds, claim verdicts, files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kava.experiments.report import (
    CLAIMS,
    FAILS,
    HOLDS,
    NOT_ESTABLISHED,
    UNMEASURED,
    ClaimNames,
    aggregate,
    check_claims,
    collect_runs,
    read_history,
    table_layout,
    write_report,
)


def make_run(
    root: Path,
    name: str,
    seed: int,
    acc: float | None,
    fp: float = 4.0,
    data: str = "synthetic",
    state: str = "finished",
    mode: str = "student",
    losses: list[float] = (),
    in_status: bool = False,
    kv_cosine: list | None = None,
) -> Path:
    """A run folder as kava.training writes it: config.yaml, status.json, eval_metrics.json, metrics.jsonl."""
    run = root / name / f"seed{seed}"
    run.mkdir(parents=True)
    cfg = {"data": {"train": data, "eval": data}, "train": {"seed": seed, "mode": "kava"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    ev = (
        {}
        if acc is None
        else {
            mode: {
                "n": 100,
                "accuracy": acc,
                "forward_passes": fp,
                "generated_tokens": 2.0,
                "kv_cache_bytes": 1000,
                "peak_kv_cache_bytes": 2000,
                "wall_time_s": 1.5,
            }
        }
    )
    status = {"state": state, "step": 10, "max_steps": 10}
    if state == "failed":
        status["error"] = "RuntimeError: boom"
    if in_status:
        status["eval"] = ev
    elif ev:
        (run / "eval_metrics.json").write_text(json.dumps(ev))
    (run / "status.json").write_text(json.dumps(status))
    rows = [{"step": i + 1, "lr": 1e-3, "loss": v, "ce_student": v / 2, "kv": v / 4} for i, v in enumerate(losses)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if kv_cosine is not None:
        (run / "kv_cosine.json").write_text(json.dumps(kv_cosine))
    return run


def _row(rows, name, dataset="synthetic", mode="student"):
    return next(r for r in rows if r["name"] == name and r["dataset"] == dataset and r["mode"] == mode)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, acc in enumerate((0.5, 0.6, 0.7)):
        make_run(root, "rkv", seed, acc, fp=4.0, losses=[3.0, 2.0, 1.0 + seed])
    for seed, acc in enumerate((0.4, 0.42)):
        make_run(root, "codi", seed, acc, fp=5.0 + seed, losses=[4.0, 3.0])
    make_run(root, "codi", 2, None, state="failed")
    make_run(root, "right_crop", 0, 0.65, in_status=True)  # eval only inside status.json
    make_run(root, "mean_pool", 0, 0.3)
    make_run(root, "mean_pool", 1, 0.5)
    for seed, acc in enumerate((0.55, 0.55)):
        make_run(root, "rkv@nl", seed, acc, data="synthetic-nl")
    for seed, acc in enumerate((0.2, 0.22)):
        make_run(root, "codi@nl", seed, acc, data="synthetic-nl")
    make_run(root, "cot", 0, 0.9, fp=37.0, mode="cot", kv_cosine=[[0.1, 0.5], [0.9, -0.2], [0.3, None]])
    return root


def test_collect_runs_reads_names_seeds_eval_and_last_metrics(runs: Path):
    recs = {(r["name"], r["seed"]): r for r in collect_runs(runs)}
    assert len(recs) == 14
    rkv = recs[("rkv", 2)]
    assert (rkv["method"], rkv["dataset"], rkv["state"]) == ("rkv", "synthetic", "finished")
    assert rkv["eval"]["student"]["accuracy"] == 0.7 and rkv["last_metrics"]["loss"] == 3.0
    assert recs[("right_crop", 0)]["eval"]["student"]["accuracy"] == 0.65
    assert recs[("codi", 2)]["state"] == "failed" and recs[("codi", 2)]["error"] == "RuntimeError: boom"
    assert recs[("rkv@nl", 0)]["method"] == "rkv" and recs[("rkv@nl", 0)]["dataset"] == "synthetic-nl"


def test_collect_runs_ignores_checkpoint_folders_and_labels_train_eval_pairs(tmp_path: Path):
    run = make_run(tmp_path, "x", 0, 0.5)
    (run / "checkpoint-10").mkdir()
    (run / "checkpoint-10" / "status.json").write_text("{}")
    (run / "config.yaml").write_text(
        yaml.safe_dump({"data": {"train": "gsm8k-aug-nl", "eval": "gsm8k"}, "train": {"seed": 0}})
    )
    (recs,) = collect_runs(tmp_path)
    assert recs["dataset"] == "gsm8k-aug-nl→gsm8k"
    single = collect_runs(run)  # a run folder given directly is a run of its own
    assert single[0]["name"] == "seed0" and single[0]["seed"] == 0


def test_aggregation_gives_mean_and_sample_std_over_seeds(runs: Path):
    rows = aggregate(collect_runs(runs))
    rkv = _row(rows, "rkv")
    assert rkv["n"] == 3 and rkv["seeds"] == [0, 1, 2]
    assert rkv["accuracy_mean"] == pytest.approx(0.6) and rkv["accuracy_std"] == pytest.approx(0.1)
    assert rkv["forward_passes_mean"] == 4.0 and rkv["forward_passes_std"] == 0.0
    codi = _row(rows, "codi")
    assert codi["n"] == 2 and codi["unfinished"] == 1  # the failed seed counts as unfinished, not in the mean
    assert codi["accuracy_mean"] == pytest.approx(0.41) and codi["accuracy_std"] == pytest.approx(0.0141421356)
    assert codi["forward_passes_mean"] == 5.5 and codi["forward_passes_std"] == pytest.approx(0.7071067812)
    one = _row(rows, "right_crop")
    assert one["n"] == 1 and one["accuracy_std"] == 0.0 and one["wall_time_s_mean"] == 1.5
    assert _row(rows, "cot", mode="cot")["forward_passes_mean"] == 37.0
    assert _row(rows, "rkv@nl", "synthetic-nl")["method"] == "rkv"
    labels, datasets, cells = table_layout(rows)
    assert datasets == ["synthetic", "synthetic-nl"]
    assert cells[("rkv", "synthetic-nl")]["name"] == "rkv@nl" and "cot" in labels


def test_verdicts_follow_the_tests(runs: Path):
    v = {x.claim: x for x in check_claims(aggregate(collect_runs(runs)))}
    # (1) rkv vs codi paired on seeds 0, 1 (codi seed 2 failed): differences +10, +18; the exact
    # sign-flip p is 1/4 (2 pairs can never reach 0.05), on NL too (+35, +33); Holm over the claim's two
    # comparisons makes both 1/2. At alpha / 2 = 0.025, 6 seeds at least (2^-6 < 0.025).
    assert v["1"].status == NOT_ESTABLISHED and v["1"].p_value == pytest.approx(0.5) and v["1"].seeds_needed == 6
    assert "paired by seed (n=2): mean difference +14.0" in v["1"].details[0] and "p = 0.25" in v["1"].details[0]
    assert "Holm-adjusted over the claim's 2 comparisons p = 0.5" in v["1"].details[0]
    assert [(x["p"], x["p_holm"]) for x in v["1"].p_values] == [(0.25, 0.5), (0.25, 0.5)]
    # (2) right_crop (seed 0 only, 65) shares one seed with rkv: a two-sample test; its mean is above
    # rkv's, so no number of seeds is expected to establish the claim.
    assert v["2"].status == NOT_ESTABLISHED and len(v["2"].details) == 2 and v["2"].seeds_needed is None
    assert (
        "unpaired, fewer than 2 common seeds" in v["2"].details[0] and "difference of means -5.0" in v["2"].details[0]
    )
    assert "not in the claimed direction" in v["2"].text()
    # (3) no shuffled run
    assert v["3"].status == UNMEASURED and v["3"].p_value is None
    # (4) drops per seed: rkv -5, +5; codi +20, +20; CODI's minus KaVa's +25, +15: p = 1/4
    assert v["4"].status == NOT_ESTABLISHED and "mean difference +20.0" in v["4"].details[0]
    assert v["5"].status == UNMEASURED
    assert all(x.status in (HOLDS, FAILS, NOT_ESTABLISHED, UNMEASURED) for x in v.values())


def _arms(root: Path, arms: dict[str, list[float]], data: str = "synthetic") -> list[dict]:
    for name, accs in arms.items():
        for seed, acc in enumerate(accs):
            make_run(root, name, seed, acc, data=data)
    return aggregate(collect_runs(root))


def test_claims_hold_only_when_the_paired_test_passes(tmp_path: Path):
    rows = _arms(
        tmp_path,
        {
            "rkv": [0.9, 0.8, 0.95, 0.7, 0.85, 0.9],
            "codi": [0.5, 0.6, 0.4, 0.65, 0.55, 0.5],  # below rkv on all 6 seeds: p = 1/64
            "shuffled": [0.95, 0.9, 0.97, 0.8, 0.9, 0.95],  # above rkv on all 6: the opposite holds
            "slot_mean": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
            "counterfactual": [0.88, 0.82, 0.9, 0.75, 0.8, 0.92],  # +2, -2, +5, -5, +5, -2: no effect to speak of
        },
    )
    v = {x.claim: x for x in check_claims(rows)}
    assert v["1"].status == HOLDS and v["1"].p_value == pytest.approx(1 / 64) and v["1"].seeds_needed is None
    assert "(passes)" in v["1"].details[0] and "sign test p = 0.0156" in v["1"].details[0]
    assert "successes (>= 90.0%) 3/6 vs 0/6, Fisher p = 0.0909" in v["1"].details[0]
    assert v["3"].status == FAILS  # shuffled better than rkv on every seed
    # (5) slot_mean passes (p = 1/64) but counterfactual does not: the claim is not established.
    assert v["5"].status == NOT_ESTABLISHED and len(v["5"].details) == 2
    assert "(passes)" in v["5"].details[0] and "(passes)" not in v["5"].details[1]
    assert v["5"].p_value > 0.05 and v["5"].seeds_needed and v["5"].seeds_needed > 6
    # The level is the report's: at alpha = 0.01 claim 1 is no longer established (p = 0.0156).
    strict = {x.claim: x for x in check_claims(rows, ClaimNames(alpha=0.01))}
    assert strict["1"].status == NOT_ESTABLISHED and strict["1"].seeds_needed == 7  # 2^-7 < 0.01 <= 2^-6
    assert "alpha = 0.01 one-sided" in strict["1"].text()


def test_only_the_claims_asked_for_are_tested(tmp_path: Path, capsys):
    from kava.cli import main

    rows = _arms(tmp_path, {"rkv": [0.9, 0.8, 0.95], "codi": [0.5, 0.6, 0.4], "slot_mean": [0.5, 0.5, 0.5]})
    assert [v.claim for v in check_claims(rows, ClaimNames(claims=("1", "4", "5")))] == ["1", "4", "5"]
    assert [v.claim for v in check_claims(rows)] == ["1", "2", "3", "4", "5"]
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r"), "--claims", "1,5", "--heatmaps", "none"]) == 0
    verdicts = json.loads((tmp_path / "r" / "verdicts.json").read_text())
    claims = [v["claim"] for v in (verdicts["claims"] if isinstance(verdicts, dict) else verdicts)]
    assert claims == ["1", "5"]
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--claims", "1,7"]) == 2
    err = capsys.readouterr().err
    assert "--claims '1,7'" in err and "no claim '7'" in err
    assert "the claims are " + ", ".join(c.number for c in CLAIMS) in err


def test_nl_claim_is_paired_over_all_four_cells(tmp_path: Path):
    rows = _arms(tmp_path / "a", {"rkv": [0.9] * 5, "codi": [0.8] * 5})
    rows += _arms(
        tmp_path / "b",
        {"rkv@nl": [0.85, 0.86, 0.84, 0.85, 0.85], "codi@nl": [0.5, 0.55, 0.45, 0.5, 0.6]},
        data="synthetic-nl",
    )
    v = {x.claim: x for x in check_claims(rows)}
    assert v["4"].status == HOLDS and v["4"].p_value == pytest.approx(1 / 32)


def test_custom_names_and_unpaired_arms(tmp_path: Path):
    for seed, acc in enumerate((0.5, 0.7)):
        make_run(tmp_path, "rkv_M8", seed, acc)
    for seed, acc in ((5, 0.55), (6, 0.61)):
        make_run(tmp_path, "shuffled", seed, acc)
    rows = aggregate(collect_runs(tmp_path))
    v = {x.claim: x for x in check_claims(rows, ClaimNames(methods={**ClaimNames().methods, "kava": ("rkv_M8",)}))}
    # No common seeds: a two-sample test over the C(4, 2) = 6 relabellings; 60 vs 58 has p = 3/6.
    assert v["3"].status == NOT_ESTABLISHED and v["3"].p_value == pytest.approx(0.5)
    assert (
        "unpaired, fewer than 2 common seeds (2 vs 2)" in v["3"].details[0]
        and "exact two-sample permutation test" in v["3"].details[0]
    )
    assert {x.claim: x.status for x in check_claims(rows)}["3"] == UNMEASURED  # default: kava/rkv absent
    pairs = ClaimNames(nl_pairs=[("a", "b")])
    assert {x.claim: x.status for x in check_claims(rows, pairs)}["4"] == UNMEASURED


def test_read_history_keeps_the_last_row_of_a_repeated_step(tmp_path: Path):
    rows = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5}, {"step": 3, "loss": 3.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["loss"] for r in read_history(tmp_path)] == [5.0, 3.5, 3.0]


def test_write_report_writes_tables_verdicts_and_plots(runs: Path, tmp_path: Path):
    out = tmp_path / "report"
    report = write_report(runs, out)
    names = {p.name for p in report.files}
    assert {
        "results.csv",
        "runs.csv",
        "curves.csv",
        "results.md",
        "results.tex",
        "verdicts.json",
        "accuracy_vs_forward_passes.png",
        "training_curves.png",
        "kv_cosine_cot_seed0.png",
    } == names
    for p in report.files:
        assert p.is_file() and p.stat().st_size > 0
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with (out / "results.csv").open() as f:
        rows = {(r["name"], r["dataset"], r["mode"]): r for r in csv.DictReader(f)}
    rkv = rows[("rkv", "synthetic", "student")]
    assert float(rkv["accuracy_mean"]) == pytest.approx(0.6) and float(rkv["accuracy_std"]) == pytest.approx(0.1)
    assert rkv["seeds"] == "0 1 2" and rkv["n"] == "3"

    md = (out / "results.md").read_text()
    assert "| rkv | 60.0 ± 10.0 | 4.0 | 55.0 ± 0.0 | 4.0 | 3/2 |" in md
    assert "| codi | 41.0 ± 1.4 | 5.5 | 21.0 ± 1.4 | 4.0 | 2 |" in md
    assert (
        "(1) KV distillation beats CODI-only: **not established** (p = 0.5, Holm-adjusted over 2 comparisons,"
        " alpha = 0.05 one-sided)"
    ) in md
    assert "**not measured**" in md and "## Statistics" in md
    assert "| rkv | synthetic | student | 3 | 60.0 ± 10.0 | 50.0 – 70.0 | 50.0 | 0/3 | 0.0 – 70.8 |" in md
    assert "codi seed 2: failed (RuntimeError: boom)" in md

    tex = (out / "results.tex").read_text()
    assert "\\toprule" in tex and "\\multicolumn{2}{c}{synthetic-nl}" in tex
    assert "right\\_crop & 65.0 $\\pm$ 0.0 & 4.0 & -- & -- \\\\" in tex
    assert "cot & \\textbf{90.0 $\\pm$ 0.0} & 37.0 & -- & -- \\\\" in tex  # the best of its column is bold
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert [v["status"] for v in verdicts] == [
        NOT_ESTABLISHED,
        NOT_ESTABLISHED,
        UNMEASURED,
        NOT_ESTABLISHED,
        UNMEASURED,
    ]
    assert verdicts[0]["p_value"] == pytest.approx(0.5) and verdicts[0]["alpha"] == 0.05
    assert verdicts[0]["p_values"][0]["comparison"] == "synthetic: rkv > codi"
    assert verdicts[0]["p_values"][0]["p"] == pytest.approx(0.25) and verdicts[0]["p_values"][0]["p_holm"] == 0.5


def test_no_kv_cosine_file_means_no_heatmap(tmp_path: Path):
    make_run(tmp_path / "runs", "rkv", 0, 0.5, losses=[1.0])
    names = {p.name for p in write_report(tmp_path / "runs").files}
    assert not any(n.startswith("kv_cosine") for n in names) and "training_curves.png" in names
    assert (tmp_path / "runs" / "report" / "results.md").is_file()


def test_cli_report(runs: Path, tmp_path: Path, capsys):
    from kava.cli import main

    assert main(["report", str(runs), "--out", str(tmp_path / "r"), "--method", "kava=rkv"]) == 0
    assert "## Claims" in capsys.readouterr().out and (tmp_path / "r" / "results.tex").is_file()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert main(["report", str(runs), "--nl-pair", "nocolon"]) == 2


def test_a_malformed_kv_cosine_file_is_a_one_line_error(tmp_path: Path, capsys):
    from kava.cli import main

    bad = make_run(tmp_path / "runs", "rkv", 0, 0.9, kv_cosine=[[0.1, 0.2], [0.3]])  # ragged rows
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad / "kv_cosine.json") in err
    assert (tmp_path / "r" / "results.csv").is_file()  # the tables written before it are kept
    (bad / "kv_cosine.json").write_text("{not json")
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "r")]) == 1
    assert "not valid JSON" in capsys.readouterr().err


def _instruments(run: Path, rows: list[tuple[int, float, float]], keeps: dict | None = None) -> None:
    lines = [
        {
            "step": s,
            "held_out": True,
            "n": 8,
            "logit_lens": {"slots": [{"slot": 0, "n": 8, "aligned": lens}], "aligned_mean": lens},
            "kv_alignment": {"n": 8, "own_below_neighbour": own, "gap": own - 0.5, "own_below_slot_mean": 0.25},
        }
        for s, lens, own in rows
    ]
    (run / "instruments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if keeps is not None:
        (run / "selector_keeps.json").write_text(json.dumps({"step": 2, "selectors": keeps}))


def test_report_shows_the_instruments(tmp_path: Path):
    keeps = {
        "rkv": {"shares": {"close": 0.5, "result": 0.1, "digit": 0.4}, "result_recall": 0.2},
        "oracle": {"shares": {"result": 0.9, "digit": 0.1}, "result_recall": 0.95},
        "_cot": {"shares": {"result": 0.2, "digit": 0.8}},
    }
    _instruments(
        make_run(tmp_path / "runs", "rkv", 0, 0.5), [(1, 0.1, 0.4), (2, 0.3, 0.8), (2, 0.5, 0.9)], keeps
    )  # step 2 twice: last wins
    _instruments(make_run(tmp_path / "runs", "rkv", 1, 0.6), [(2, 0.1, 0.6)], keeps)
    make_run(tmp_path / "runs", "codi", 0, 0.4)
    report = write_report(tmp_path / "runs", tmp_path / "out")
    names = {p.name for p in report.files}
    assert {"instruments.png", "logit_lens_slots.png", "selector_keeps.png"} <= names
    md = (tmp_path / "out" / "results.md").read_text()
    # rkv: lens (0.5 + 0.1) / 2 = 30%, own < neighbour (0.9 + 0.6) / 2 = 75%, gap (0.4 + 0.1) / 2
    assert "| rkv | synthetic | 2 | yes | 2 | 30.0 | 75.0 | +0.250 | 25.0 |" in md
    assert "| codi |" not in md.split("## Instruments")[1]
    (tmp_path / "runs" / "rkv" / "seed1" / "instruments.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"instruments.jsonl:1: not an instruments row"):
        collect_runs(tmp_path / "runs")


def _teachers_rows():
    """Rows shaped like the teachers report: forward passes all about 6, wide bimodal accuracy spreads."""

    def row(name, acc, std, fp, fp_std=0.0):
        return {
            "name": name,
            "mode": "student",
            "dataset": "synthetic",
            "accuracy_mean": acc,
            "accuracy_std": std,
            "forward_passes_mean": fp,
            "forward_passes_std": fp_std,
        }

    return [
        row("fused", 0.73, 0.45, 6.0),
        row("fused_entropy", 0.72, 0.44, 6.0),
        row("fused_fixed", 0.735, 0.43, 6.0),
        row("frozen_self", 0.74, 0.45, 6.0),
        row("large", 0.73, 0.44, 6.0),
        row("self", 0.965, 0.04, 6.0027, 0.0046),
    ]


def _text_boxes(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    from matplotlib.text import Text

    found = {id(t): t for t in fig.findobj(Text)}.values()  # findobj may meet a text twice
    texts = [t for t in found if t.get_visible() and t.get_text().strip()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts]


def test_accuracy_plot_axes_show_the_data_within_0_to_100():
    from kava.experiments.report.plots import accuracy_figure

    fig = accuracy_figure(_teachers_rows())
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 100.0)
    lo, hi = ax.get_xlim()
    assert hi - lo >= 2.0 and lo <= 6.0 - 0.5 and hi >= 6.0027 + 0.5 and lo >= 0.0  # not 5.998-6.007
    ys = [y for c in ax.collections for seg in c.get_segments() for _, y in seg]
    assert (
        ys and min(ys) >= 0.0 and max(ys) <= 100.0 and max(ys) == pytest.approx(100.0)
    )  # the 73 ± 45 bar stops at 100
    assert not ax.xaxis.get_major_formatter().get_offset()  # tick labels are plain numbers, no "+6" offset
    legend = fig.legends[0]
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(r["name"] for r in _teachers_rows())
    boxes = _text_boxes(fig)
    overlaps = [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1 :] if ba.overlaps(bb)]
    assert not overlaps  # names, tick labels, titles: no two texts overlap
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())


def test_training_curves_nearly_constant_term_gets_a_readable_axis(tmp_path: Path):
    from kava.experiments.report import collect_runs
    from kava.experiments.report.plots import training_curves_figure

    make_run(tmp_path / "runs", "rkv", 0, 0.5, losses=[2.0, 2.000001, 2.000002])
    fig = training_curves_figure(collect_runs(tmp_path / "runs"))
    loss_ax = next(a for a in fig.axes if a.get_title() == "loss")
    lo, hi = loss_ax.get_ylim()
    assert lo < 2.0 < hi and hi - lo >= 0.02  # 1% of the value, not a 2e-6 wide axis
    assert not loss_ax.yaxis.get_major_formatter().get_offset()


def test_paired_table_compares_every_arm_with_codi_and_rkv_by_seed(tmp_path: Path):
    from kava.experiments.report import paired_table

    root = tmp_path / "runs"
    for seed in range(5):
        make_run(root, "codi", seed, 0.5 + 0.01 * seed)
        make_run(root, "rkv", seed, 0.8 + 0.01 * seed)  # +30 points on every seed
        make_run(root, "slot_mean", seed, 0.5 + 0.01 * seed - (0.02 if seed % 2 else -0.02))
    text = paired_table(aggregate(collect_runs(root)))
    line = next(ln for ln in text.splitlines() if ln.startswith("| rkv | codi |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "5" and cells[4] == "+30.0" and cells[6] == "0.0625"  # two-sided: 2/32, every sign the same
    assert "p (two-sided)" in text.splitlines()[0]
    against_rkv = next(ln for ln in text.splitlines() if ln.startswith("| slot_mean | rkv |"))
    assert [c.strip() for c in against_rkv.strip("|").split("|")][4] == "-29.6"  # (3 x -28 + 2 x -32) / 5
    assert not any(ln.startswith("| codi | codi |") for ln in text.splitlines())


def test_heatmaps_first_seed_draws_one_per_name(tmp_path: Path):
    root = tmp_path / "runs"
    grid = [[0.5, 0.6], [0.7, 0.8]]
    for seed in (1, 0, 2):
        make_run(root, "rkv", seed, 0.9, kv_cosine=grid)
    made = {
        p.name
        for p in write_report(root, tmp_path / "rep", heatmaps="first-seed").files
        if p.name.startswith("kv_cosine")
    }
    assert made == {"kv_cosine_rkv_seed0.png"}
    assert not [
        p for p in write_report(root, tmp_path / "rep2", heatmaps="none").files if p.name.startswith("kv_cosine")
    ]
    with pytest.raises(ValueError, match="heatmaps"):
        write_report(root, tmp_path / "rep3", heatmaps="some")


def test_statistics_table_gives_spread_worst_seed_and_success_rate(runs: Path):
    from kava.experiments.report import statistics_table

    text = statistics_table(aggregate(collect_runs(runs)), ClaimNames(success_at=0.55))
    line = next(ln for ln in text.splitlines() if ln.startswith("| rkv | synthetic |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3] == "3" and cells[4] == "60.0 ± 10.0"  # 0.5, 0.6, 0.7
    assert cells[6] == "50.0"  # the worst seed
    assert cells[7] == "2/3"  # 0.6 and 0.7 reach 0.55


def test_a_claim_of_two_comparisons_cannot_hold_with_one_unmeasured(tmp_path: Path):
    # R-KV beats the counterfactual CoT on every one of 6 seeds (p = 1/64), but no slot-mean run:
    # claim 5 needs both, so it is not established, and the report says which comparison is missing.
    rows = _arms(
        tmp_path / "runs",
        {"rkv": [0.9 + 0.01 * s for s in range(6)], "counterfactual": [0.5 + 0.01 * s for s in range(6)]},
    )
    v = {x.claim: x for x in check_claims(rows)}["5"]
    assert v.status == NOT_ESTABLISHED and v.p_value == pytest.approx(1 / 64)
    assert v.unmeasured == ["kava/rkv against slot_mean"]
    assert "not measured: kava/rkv against slot_mean, so the claim cannot hold" in v.text()
    rows = _arms(
        tmp_path / "more",
        {"rkv": [0.9 + 0.01 * s for s in range(6)], "counterfactual": [0.5] * 6, "slot_mean": [0.4] * 6},
    )
    v = {x.claim: x for x in check_claims(rows)}["5"]
    assert v.status == HOLDS and v.unmeasured == []
    # Short of the level with one control missing: both reasons are given.
    rows = _arms(tmp_path / "weak", {"rkv": [0.6, 0.7, 0.5, 0.8, 0.6], "counterfactual": [0.5, 0.72, 0.45, 0.7, 0.62]})
    v = {x.claim: x for x in check_claims(rows)}["5"]
    assert v.status == NOT_ESTABLISHED and v.seeds_needed and v.unmeasured
    assert "so the claim cannot hold; about" in v.text() and "seeds per arm would be needed" in v.text()


def test_arms_table_gives_each_arm_against_codi_and_rkv_with_two_sided_p(tmp_path: Path):
    from kava.experiments.report import arms_table

    rows = _arms(
        tmp_path / "runs",
        {"codi": [0.5, 0.51, 0.52, 0.53, 0.54], "rkv": [0.8, 0.81, 0.82, 0.83, 0.95], "slot_mean": [0.9, 0.9, 0.9]},
    )
    cells = {
        ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")]
        for ln in arms_table(rows).splitlines()[2:]
    }
    assert cells["rkv"][2:6] == ["5", "84.2 ± 6.1", "80.0", "1/5 (0.5-71.6)"]  # sample std
    assert cells["rkv"][6] == "+32.2 (p = 0.0625, n=5)" and cells["rkv"][7] == "--"  # two-sided: 2/32
    assert cells["codi"][6] == "--" and cells["codi"][7] == "-32.2 (p = 0.0625, n=5)"  # the same either way round
    assert cells["slot_mean"][6] == "+39.0 (p = 0.25, n=3)"  # 3 common seeds: 2/8 is the smallest two-sided p
    assert "(two-sided p)" in arms_table(rows).splitlines()[0]


def test_a_one_sided_p_in_the_observed_direction_is_never_a_pass(tmp_path: Path):
    # Shuffled is above R-KV on all 5 seeds: one-sided p = 1/32 in the direction observed, but the claim's
    # direction is R-KV above shuffled (p = 1); two-sided p = 1/16 > 0.05, so the claim is not established,
    # not "does not hold", and nothing is marked as passing.
    rows = _arms(tmp_path, {"rkv": [0.6, 0.7, 0.65, 0.62, 0.7], "shuffled": [0.8, 0.9, 0.85, 0.82, 0.9]})
    v = {x.claim: x for x in check_claims(rows)}["3"]
    assert v.status == NOT_ESTABLISHED and v.p_value == pytest.approx(1.0)
    assert "(passes)" not in v.details[0] and "p = 1 one-sided as claimed" in v.details[0]
    assert "against the claim, two-sided p = 0.0625" in v.details[0]


def test_a_claim_of_several_comparisons_is_decided_on_holm_adjusted_p_values(tmp_path: Path):
    # R-KV above both controls on all 5 seeds: each raw p = 1/32 passes alone, but Holm over the claim's two
    # comparisons doubles the smaller (and so both) to 1/16 > 0.05: claim 5 is not established.
    rows = _arms(
        tmp_path,
        {
            "rkv": [0.9, 0.91, 0.92, 0.93, 0.94],
            "slot_mean": [0.5, 0.52, 0.5, 0.6, 0.55],
            "counterfactual": [0.6, 0.61, 0.6, 0.7, 0.65],
        },
    )
    v = {x.claim: x for x in check_claims(rows)}["5"]
    assert v.status == NOT_ESTABLISHED and v.p_value == pytest.approx(1 / 16)
    assert [x["p"] for x in v.p_values] == [1 / 32, 1 / 32] and [x["p_holm"] for x in v.p_values] == [1 / 16, 1 / 16]
    assert not any("(passes)" in d for d in v.details)
    assert v.seeds_needed == 6  # at alpha / 2 = 0.025 the exact test needs 2^-6
    # With 6 seeds each raw p is 1/64 and Holm's 1/32: the claim holds.
    rows = _arms(tmp_path / "six", {"rkv": [0.9] * 6, "slot_mean": [0.5] * 6, "counterfactual": [0.6] * 6})
    v = {x.claim: x for x in check_claims(rows)}["5"]
    assert v.status == HOLDS and v.p_value == pytest.approx(1 / 32) and all("(passes)" in d for d in v.details)


def test_selector_keeps_are_given_per_dataset_with_the_step_they_were_measured_at(tmp_path: Path):
    from kava.experiments.report import selector_keeps_by_dataset

    def keeps(recall):
        return {
            "rkv": {"shares": {"result": recall / 2, "digit": 1 - recall / 2}, "result_recall": recall},
            "_cot": {"shares": {"result": 0.15, "digit": 0.85}},
        }

    root = tmp_path / "runs"
    for seed, recall in enumerate((0.8, 0.76)):
        _instruments(make_run(root, "rkv", seed, 0.9), [(2, 0.1, 0.9)], keeps(recall))
    for seed in range(2):
        _instruments(make_run(root, "rkv@nl", seed, 0.9, data="synthetic-nl"), [(2, 0.1, 0.9)], keeps(0.6))
    for run in root.rglob("selector_keeps.json"):  # as the training loop writes them: at step 0
        run.write_text(json.dumps({**json.loads(run.read_text()), "step": 0}))
    runs = collect_runs(root)
    by_ds = selector_keeps_by_dataset(runs)
    assert by_ds["synthetic"]["recall"]["rkv"] == pytest.approx(0.78) and by_ds["synthetic-nl"]["recall"]["rkv"] == 0.6
    assert by_ds["synthetic"]["steps"] == [0] and by_ds["synthetic"]["runs"] == 2
    report = write_report(root, tmp_path / "out")
    md = (tmp_path / "out" / "results.md").read_text()
    assert "measured at step 0, on the teacher the runs start from" in md
    assert "| selector | synthetic (2 runs) | synthetic-nl (2 runs) |" in md and "| rkv | 78.0 | 60.0 |" in md
    assert "| result tokens in the CoT | 15.0 | 15.0 |" in md
    assert any(p.name == "selector_keeps.png" for p in report.files)


def test_a_report_is_re_derived_from_its_runs_csv(tmp_path: Path, capsys):
    from kava.cli import main

    root = tmp_path / "runs"
    keeps = {
        "rkv": {"shares": {"result": 0.2, "digit": 0.8}, "result_recall": 0.7},
        "_cot": {"shares": {"result": 0.2}},
    }
    for seed in range(5):
        _instruments(make_run(root, "rkv", seed, 0.8 + 0.01 * seed), [(2, 0.1, 0.9)], keeps)
        make_run(root, "codi", seed, 0.6 + 0.02 * seed)
    out = tmp_path / "report"
    first = write_report(root, out)
    before = (out / "results.md").read_text()
    (out / "verdicts.json").write_text("[]")  # stale: to be re-derived
    again = write_report(out / "runs.csv")
    assert [p.name for p in again.files] == ["results.md", "verdicts.json"]
    want = json.loads(json.dumps([v.__dict__ for v in first.verdicts]))
    assert json.loads((out / "verdicts.json").read_text()) == want
    md = (out / "results.md").read_text()
    assert "Re-derived by `kava report " in md.splitlines()[2]
    assert md.split("## Instruments")[1] == before.split("## Instruments")[1]  # carried over, selector keeps included
    claims = [text.split("## Claims")[1].split("## Instruments")[0] for text in (md, before)]
    assert claims[0] == claims[1]
    rows = (out / "runs.csv").read_text().splitlines()
    (out / "runs.csv").write_text("\n".join([rows[0], rows[1].replace(",0.6,", ",most,")] + rows[2:]) + "\n")
    assert main(["report", str(out / "runs.csv")]) == 1
    assert "runs.csv:2: accuracy is 'most', not a number" in capsys.readouterr().err


def test_area_under_the_held_out_curve_is_the_secondary_outcome(tmp_path: Path):
    from kava.experiments.report import area_rows, curve_area, write_report

    assert curve_area([(2, 0.2), (4, 0.6), (10, 0.6)]) == pytest.approx((2 * 0.4 + 6 * 0.6) / 8)
    assert curve_area([(10, 0.5)]) is None
    # Two arms whose final accuracies tie while one learned earlier: the area tells them apart.
    for seed in range(6):
        for name, early in (("rkv", 0.8), ("codi", 0.3 + 0.01 * seed)):
            run = make_run(tmp_path, name, seed, 0.9)
            for step, acc in ((2, early), (6, (early + 0.9) / 2)):
                (run / f"eval-{step}").mkdir()
                (run / f"eval-{step}" / "eval_metrics.json").write_text(
                    json.dumps({"student": {"n": 100, "accuracy": acc}})
                )
    rows = aggregate(collect_runs(tmp_path))
    codi = _row(rows, "codi")
    assert codi["area_by_seed"][0] == pytest.approx(curve_area([(2, 0.3), (6, 0.6), (10, 0.9)]))
    v = {x.claim: x for x in check_claims(rows)}
    assert v["1"].status == NOT_ESTABLISHED  # final accuracies tie on every seed
    v2 = {x.claim: x for x in check_claims(area_rows(rows))}
    assert v2["1"].status == HOLDS and v2["1"].p_value == pytest.approx(1 / 64)
    report = write_report(tmp_path, tmp_path / "out", heatmaps="none")
    assert "## Secondary outcome" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "verdicts_secondary.json").read_text())[0]["status"] == HOLDS
    assert report.verdicts[0].status == NOT_ESTABLISHED
    curves = (tmp_path / "out" / "curves.csv").read_text().splitlines()
    assert curves[0] == "name,seed,dataset,mode,step,accuracy" and len(curves) == 1 + 12 * 3
    assert "codi,0,synthetic,student,2,0.3" in curves

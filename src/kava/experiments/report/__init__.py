"""Results of many runs: tables (CSV, Markdown, LaTeX), plots and a verdict on each claim.

A run is any folder under ``runs_dir`` holding a ``status.json``. Its name is the folder
above ``seedN`` (so the seeds of ``runs/abl/rkv/seed0..2`` form the run ``rkv``); a folder
not called ``seedN`` is a run of its own (its seed read from ``config.yaml``). The method is
the name up to an ``@`` (``rkv@nl`` is the method ``rkv``, see :mod:`kava.experiments.sweep`); the
dataset is the config's ``data.eval``, written ``train→eval`` when ``data.train`` is not the
same name. Over the seeds of one name, dataset and eval mode, accuracy and forward passes
are given as mean and sample std (0 for one seed).

Accuracies are fractions in ``results.csv`` and ``verdicts.json``, percentages in the
Markdown and LaTeX tables and in the verdict text. The claims are tested seed by seed with the
exact tests of :mod:`kava.experiments.stats`: a claim holds only when its one-sided tests, in the
direction the claim declares and Holm-adjusted within the claim, pass at the level the report states. The descriptive tables (per
arm, every arm against CODI-only and R-KV) give two-sided p-values and test no claim.

Plots (matplotlib, Agg canvas, no display needed): accuracy against forward passes,
training curves (loss terms against step, mean over seeds), and, for every run folder that
holds a ``kv_cosine.json`` (a ``[layers][slots]`` list of teacher-student cosine
similarities), a heatmap of it. Run folders without that file are skipped silently.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ...io import atomic_write, atomic_write_json, atomic_write_text, check_output_folder
from .. import stats
from .collect import _SEED_DIR, RUNS_CSV_FIELDS, RunFileError, _read_json, _read_config, read_history, read_instruments, dataset_label, method_of, collect_runs, _collect_run, read_eval_curves, collect_runs_csv  # noqa: F401
from .aggregate import EVAL_FIELDS, curve_area, mean_std, aggregate, sem, area_rows  # noqa: F401
from .fmt import percent, pval, acc_pm  # noqa: F401
from .claims import HOLDS, FAILS, NOT_ESTABLISHED, UNMEASURED, ClaimNames, Verdict, _cell, RoleTable, _Test, successes, _describe, _beats, _verdict, _nl_pairs, _beats_all, _smaller_drop, Claim, CLAIMS, _check, check_claims  # noqa: F401
from .tables import row_labels, table_layout, _fp, CSV_FIELDS, to_csv, to_markdown, _TEX, _tex, to_latex, to_runs_csv, to_curves_csv, statistics_table, paired_table, _versus, arms_table  # noqa: F401
from .instruments import lens_score, alignment, instrument_rows, instruments_markdown, selector_keeps_by_dataset, selector_keeps_markdown  # noqa: F401
from .plots import LOSS_TERMS, HEATMAPS, _UNSAFE, _figure, _save, padded_range, plot_accuracy_vs_passes, accuracy_figure, matplotlib_colors, plot_training_curves, training_curves_figure, plot_kv_cosine, plot_instruments, plot_logit_lens_slots, plot_selector_keeps, _heatmap_runs, write_plots  # noqa: F401

log = logging.getLogger("kava.report")  # the name its log lines have always had


# --- collecting ---------------------------------------------------------------------------


# --- aggregation --------------------------------------------------------------------------


# --- claims -------------------------------------------------------------------------------


# --- tables -------------------------------------------------------------------------------


# --- plots --------------------------------------------------------------------------------


# --- instruments ---------------------------------------------------------------------------


# --- the report ---------------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`write_report` produced."""

    runs: list[dict]
    rows: list[dict]
    verdicts: list[Verdict]
    files: list[Path]
    skipped: list[str] = field(default_factory=list)
    """One line per run folder left out for a malformed file (naming it)."""


def to_report_markdown(runs: Sequence[dict], rows: Sequence[dict], verdicts: Sequence[Verdict], names: ClaimNames | None = None) -> str:
    """``results.md``: the table, the statistics per group, the verdicts and the runs that did not finish."""
    names = names or ClaimNames()
    parts = ["# Results", "", f"{len(runs)} run folder(s), {len(rows)} (method, dataset, mode) group(s).",
             "Accuracy in %, mean ± sample std over seeds; # FP: forward passes per question.", "", to_markdown(rows),
             "## Statistics", "", "Bootstrap: percentile, 9,999 resamples, seeded; success intervals: exact (Clopper-Pearson).", "",
             statistics_table(rows, names), "## Claims", "",
             "A claim **holds** only when every comparison behind it passes a one-sided test, in the direction the"
             f" claim declares, at alpha = {names.alpha:g} (on the `{names.mode}` evaluation), after Holm's adjustment"
             " over the claim's comparisons (its datasets and controls: one family per claim); it **does not hold** when one"
             " points the other way with an adjusted two-sided p-value at or under alpha (a one-sided p-value in the"
             " direction observed is never counted as a pass), and is otherwise"
             " **not established**, with the seeds per arm it would need at the observed effect and spread, at"
             " alpha / m for m comparisons"
             f" ({100 * names.power:.0f}% power, normal approximation, never fewer than the"
             f" {stats.min_exact_seeds(names.alpha)} an exact sign-flip test needs). Arms are compared paired by seed (they"
             " share the data order per seed) with an exact sign-flip permutation test of the mean difference, or with a"
             " two-sample permutation test where they share no seeds; the sign test and Fisher's exact test on success"
             " rates are given beside it.", ""]
    parts += [v.text() + "\n" for v in verdicts]
    arms = arms_table(rows, names)
    if arms:
        parts += ["## Per arm", "",
                  f"On the `{names.mode}` evaluation. Each arm against CODI-only and R-KV of its dataset, paired by seed:"
                  " the mean difference in points, the two-sided p-value of the exact sign-flip test, and the common"
                  " seeds. This describes the data; the claims above are the tests.", "", arms]
    paired = paired_table(rows, names)
    if paired:
        parts += ["## Every arm against CODI-only and R-KV", "",
                  "Paired by seed, on the `" + names.mode + "` evaluation; two-sided p-values of the exact sign-flip"
                  " test. This describes the data and tests no claim: across many arms, some p-values fall under"
                  " any level by chance.", "", paired]
    inst = instruments_markdown(runs)
    if inst:
        parts += [inst]
    keeps = selector_keeps_markdown(runs)
    if keeps:
        parts += [keeps]
    bad = [r for r in runs if r["state"] != "finished"]
    if bad:
        parts += ["## Runs not finished", ""]
        parts += [f"- {r['name']} seed {r['seed']}: {r['state']}" + (f" ({r['error']})" if r["error"] else "") for r in bad]
        parts.append("")
    return "\n".join(parts)


CARRIED_SECTIONS = ("## Instruments", "## What each selector keeps")
"""Sections of ``results.md`` that need the run folders; :func:`rederive_report` carries them over."""


def _sections(markdown: str, heads: Sequence[str]) -> list[str]:
    """The ``## `` sections of ``markdown`` whose heading starts with one of ``heads``."""
    parts = re.split(r"(?m)^(?=## )", markdown)
    return [p.rstrip("\n") + "\n" for p in parts if p.startswith(tuple(heads))]


def rederive_report(runs_csv: str | Path, out_dir: str | Path | None = None, names: ClaimNames | None = None) -> Report:
    """The tables and verdicts again from an earlier report's ``runs.csv`` (the per-seed accuracies),
    for when its run folders are gone: writes ``results.md`` and ``verdicts.json`` to ``out_dir``
    (default: the folder of ``runs_csv``) and leaves every other file there as it is. The sections
    of the old ``results.md`` that need the run folders (instruments, selector keeps) are carried over
    verbatim, marked as such."""
    runs = collect_runs_csv(runs_csv)
    rows = aggregate(runs)
    verdicts = check_claims(rows, names)
    out = Path(out_dir) if out_dir else Path(runs_csv).parent
    out.mkdir(parents=True, exist_ok=True)
    old = (out / "results.md").read_text(encoding="utf-8") if (out / "results.md").is_file() else ""
    carried = _sections(old, CARRIED_SECTIONS)
    head, _, rest = to_report_markdown(runs, rows, verdicts, names).partition("\n\n")
    note = (f"Re-derived by `kava report {Path(runs_csv).as_posix()}` from the per-seed accuracies in that file"
            + ("; the last sections need the run folders and are carried over from the report written from them."
               if carried else "."))
    md = f"{head}\n\n{note}\n\n{rest.rstrip()}\n" + "".join("\n" + c for c in carried)
    atomic_write_text(out / "results.md", md)
    atomic_write_json(out / "verdicts.json", [asdict(v) for v in verdicts])
    log.info("report on %d run(s) from %s re-derived in %s", len(runs), runs_csv, out)
    return Report(runs, rows, verdicts, [out / "results.md", out / "verdicts.json"])


def secondary_markdown(verdicts: Sequence[Verdict]) -> str:
    """The claims tested on the secondary outcome, the area under the held-out accuracy curve."""
    parts = ["## Secondary outcome: area under the held-out accuracy curve", "",
             "The same claims and tests on each seed's mean held-out accuracy over training (the trapezoid rule over"
             " its evaluations, divided by the steps they span). A secondary outcome: no claim rests on it.", ""]
    return "\n".join(parts + [v.text() + "\n" for v in verdicts])


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, names: ClaimNames | None = None,
                 heatmaps: str = "all") -> Report:
    """Collect the runs under ``runs_dir`` and write the report to ``out_dir`` (default ``runs_dir/report``).
    Where ``runs_dir`` is a file, it is the ``runs.csv`` of an earlier report: see :func:`rederive_report`.

    Files: ``results.csv``, ``runs.csv`` (one row per run), ``curves.csv`` (each run's held-out accuracy
    at every evaluation during training and at the end), ``results.md``, ``results.tex``,
    ``verdicts.json``, ``accuracy_vs_forward_passes.png``, ``training_curves.png``, a
    ``kv_cosine_<name>_seed<N>.png`` per run folder with a ``kv_cosine.json`` and, where runs wrote
    their instruments, ``instruments.png``, ``logit_lens_slots.png`` and ``selector_keeps.png``.
    ``heatmaps``: ``all`` (a KV cosine heatmap per run), ``first-seed`` (per name, its lowest seed's) or ``none``.
    """
    if heatmaps not in HEATMAPS:
        raise ValueError(f"heatmaps={heatmaps!r}: choose from {', '.join(HEATMAPS)}")
    if Path(runs_dir).is_file():
        return rederive_report(runs_dir, out_dir, names)
    out = check_output_folder(Path(out_dir) if out_dir else Path(runs_dir) / "report", "--out")
    skipped: list[str] = []
    runs = collect_runs(runs_dir, skipped)
    if not runs:  # nothing to report: no output folder is made (the command says so in one line)
        return Report(runs, [], [], [], skipped)
    rows = aggregate(runs)
    verdicts = check_claims(rows, names)
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def text(name: str, content: str) -> None:
        atomic_write_text(out / name, content)
        files.append(out / name)

    text("results.csv", to_csv(rows))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUNS_CSV_FIELDS)
    for r in runs:
        for mode, m in sorted((r["eval"] or {"": {}}).items()):
            w.writerow([r["name"], r["seed"], r["dataset"], r["state"], r["step"], r["max_steps"], mode, m.get("accuracy"),
                        m.get("forward_passes"), r["last_metrics"].get("loss"), r["error"], r["path"]])
    text("runs.csv", buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "seed", "dataset", "mode", "step", "accuracy"])
    for r in runs:
        for mode, points in sorted(r.get("curves", {}).items()):
            w.writerows([r["name"], r["seed"], r["dataset"], mode, step, acc] for step, acc in points)
    text("curves.csv", buf.getvalue())
    markdown = to_report_markdown(runs, rows, verdicts, names)
    secondary = check_claims(area_rows(rows), names)
    if any(r["by_seed"] for r in area_rows(rows)):
        markdown += secondary_markdown(secondary)
        atomic_write_json(out / "verdicts_secondary.json", [asdict(v) for v in secondary])
        files.append(out / "verdicts_secondary.json")
    text("results.md", markdown)
    text("results.tex", to_latex(rows))
    atomic_write_json(out / "verdicts.json", [asdict(v) for v in verdicts])
    files.append(out / "verdicts.json")
    for made in (plot_accuracy_vs_passes(rows, out / "accuracy_vs_forward_passes.png"),
                 plot_training_curves(runs, out / "training_curves.png"),
                 plot_instruments(runs, out / "instruments.png"),
                 plot_logit_lens_slots(runs, out / "logit_lens_slots.png"),
                 plot_selector_keeps(runs, out / "selector_keeps.png"),
                 *(plot_kv_cosine(r, out / f"kv_cosine_{_UNSAFE.sub('_', r['name'])}_seed{r['seed']}.png")
                   for r in _heatmap_runs(runs, heatmaps))):
        if made is not None:
            files.append(made)
    log.info("report on %d run(s) written to %s", len(runs), out)
    return Report(runs, rows, verdicts, files, skipped)


__all__ = [
    "ClaimNames", "FAILS", "HOLDS", "NOT_ESTABLISHED", "Report", "UNMEASURED", "Verdict", "aggregate", "arms_table", "check_claims", "collect_runs", "dataset_label", "mean_std", "method_of", "paired_table",
    "instrument_rows", "instruments_markdown", "plot_accuracy_vs_passes", "plot_instruments", "plot_kv_cosine",
    "plot_logit_lens_slots", "plot_selector_keeps", "plot_training_curves", "read_history", "read_instruments", "sem", "statistics_table", "table_layout", "to_csv",
    "to_latex", "to_markdown", "write_report", "selector_keeps_by_dataset", "selector_keeps_markdown",
    "collect_runs_csv", "rederive_report", "area_rows", "curve_area", "read_eval_curves", "secondary_markdown",
]

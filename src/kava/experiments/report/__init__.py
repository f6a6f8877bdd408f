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
direction the claim declares and Holm-adjusted within the claim, pass at the level the report
states. The descriptive tables (per arm, every arm against CODI-only and R-KV) give two-sided
p-values and test no claim.

Plots (matplotlib, Agg canvas, no display needed): accuracy against forward passes,
training curves (loss terms against step, mean over seeds), and, for every run folder that
holds a ``kv_cosine.json`` (a ``[layers][slots]`` list of teacher-student cosine
similarities), a heatmap of it. Run folders without that file are skipped silently.

The modules, each importing only those above it: ``collect`` (reading run folders, or an earlier
report's ``runs.csv``), ``aggregate`` (over seeds), ``fmt`` (how numbers are written), ``claims``
(the claims as data, and their verdicts), ``tables`` (CSV, Markdown, LaTeX), ``instruments`` (what
the runs' instruments measured), ``plots`` and ``write`` (the report as files). They import
:mod:`kava.io` and :mod:`kava.experiments.stats`; this package's names below are its public API.
"""

from .aggregate import aggregate, area_rows, curve_area, mean_std, sem
from .claims import CLAIMS, FAILS, HOLDS, NOT_ESTABLISHED, UNMEASURED, Claim, ClaimNames, Verdict, check_claims
from .collect import (
    collect_runs,
    collect_runs_csv,
    dataset_label,
    method_of,
    read_eval_curves,
    read_history,
    read_instruments,
)
from .instruments import instrument_rows, instruments_markdown, selector_keeps_by_dataset, selector_keeps_markdown
from .plots import (
    plot_accuracy_vs_passes,
    plot_instruments,
    plot_kv_cosine,
    plot_logit_lens_slots,
    plot_selector_keeps,
    plot_training_curves,
)
from .tables import arms_table, paired_table, statistics_table, table_layout, to_csv, to_latex, to_markdown
from .write import Report, rederive_report, secondary_markdown, to_report_markdown, write_report

__all__ = [
    "CLAIMS",
    "FAILS",
    "HOLDS",
    "NOT_ESTABLISHED",
    "UNMEASURED",
    "Claim",
    "ClaimNames",
    "Report",
    "Verdict",
    "aggregate",
    "area_rows",
    "arms_table",
    "check_claims",
    "collect_runs",
    "collect_runs_csv",
    "curve_area",
    "dataset_label",
    "instrument_rows",
    "instruments_markdown",
    "mean_std",
    "method_of",
    "paired_table",
    "plot_accuracy_vs_passes",
    "plot_instruments",
    "plot_kv_cosine",
    "plot_logit_lens_slots",
    "plot_selector_keeps",
    "plot_training_curves",
    "read_eval_curves",
    "read_history",
    "read_instruments",
    "rederive_report",
    "secondary_markdown",
    "selector_keeps_by_dataset",
    "selector_keeps_markdown",
    "sem",
    "statistics_table",
    "table_layout",
    "to_csv",
    "to_latex",
    "to_markdown",
    "to_report_markdown",
    "write_report",
]

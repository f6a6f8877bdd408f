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

log = logging.getLogger("kava.report")  # the name its log lines have always had

LOSS_TERMS = ("loss", "ce_student", "ce_teacher", "codi", "kv", "kv_cos", "latent_ce")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


# --- collecting ---------------------------------------------------------------------------


# --- aggregation --------------------------------------------------------------------------


# --- claims -------------------------------------------------------------------------------


# --- tables -------------------------------------------------------------------------------


# --- plots --------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def padded_range(lo: float, hi: float, min_span: float, floor: float | None = None) -> tuple[float, float]:
    """Axis limits around data in [lo, hi]: 8% padding each side, at least ``min_span`` wide
    (nearly equal values get a readable axis, not 5.998-6.007), never below ``floor``."""
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    a, b = mid - 0.54 * span, mid + 0.54 * span
    if floor is not None and a < floor:
        a, b = floor, max(b, floor + 1.08 * span)
    return a, b


def plot_accuracy_vs_passes(rows: Sequence[dict], path: Path) -> Path | None:
    """:func:`accuracy_figure` written to ``path`` (None without any accuracy)."""
    fig = accuracy_figure(rows)
    return None if fig is None else _save(fig, path)


def accuracy_figure(rows: Sequence[dict]) -> Any:
    """One panel per dataset: a point per run name (and mode) at (forward passes, accuracy %),
    std error bars clipped to 0-100%, the accuracy axis 0-100%, the forward-pass axis at least
    2 passes wide; a legend names the points (a colour per name across panels)."""
    rows = [r for r in rows if r["accuracy_mean"] is not None and r["forward_passes_mean"] is not None]
    if not rows:
        return None
    labels = row_labels(rows, "name")
    names = sorted({labels[(r["name"], r["mode"])] for r in rows})
    palette = matplotlib_colors(len(names))
    colour = {n: palette[i] for i, n in enumerate(names)}
    datasets = sorted({r["dataset"] for r in rows})
    fig = _figure(4.5 * len(datasets) + 2.0, 4)
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    for ax, ds in zip(axes, datasets):
        here = [r for r in rows if r["dataset"] == ds]
        for r in here:
            acc, std = 100 * r["accuracy_mean"], 100 * (r["accuracy_std"] or 0.0)
            yerr = [[min(std, acc)], [min(std, 100 - acc)]]  # the interval clipped to 0-100%
            ax.errorbar(r["forward_passes_mean"], acc, xerr=r["forward_passes_std"] or 0.0, yerr=yerr, fmt="o", capsize=3,
                        color=colour[labels[(r["name"], r["mode"])]], clip_on=False)
        lo = min(r["forward_passes_mean"] - (r["forward_passes_std"] or 0.0) for r in here)
        hi = max(r["forward_passes_mean"] + (r["forward_passes_std"] or 0.0) for r in here)
        ax.set_xlim(*padded_range(lo, hi, min_span=2.0, floor=0.0))
        ax.set_ylim(0, 100)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set(title=ds, xlabel="forward passes per question", ylabel="accuracy (%)")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour[n], marker="o", linestyle="", label=n) for n in names]
    fig.legend(handles, names, loc="outside right upper", fontsize=8, ncols=1 + len(names) // 16)
    return fig


def matplotlib_colors(n: int) -> list:
    """``n`` distinct colours (matplotlib's default cycle, then tab20)."""
    import matplotlib

    cycle = [c["color"] for c in matplotlib.rcParams["axes.prop_cycle"]]
    if n <= len(cycle):
        return cycle[:n]
    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def plot_training_curves(runs: Sequence[dict], path: Path) -> Path | None:
    """:func:`training_curves_figure` written to ``path`` (None without any loss term)."""
    fig = training_curves_figure(runs)
    return None if fig is None else _save(fig, path)


def training_curves_figure(runs: Sequence[dict]) -> Any:
    """A panel per loss term present in ``metrics.jsonl``; a line per run name, mean over its seeds."""
    curves: dict[str, dict[int, dict[str, list[float]]]] = {}
    for run in runs:
        for row in read_history(run["path"]):
            by_step = curves.setdefault(run["name"], {}).setdefault(int(row["step"]), {})
            for term in LOSS_TERMS:
                if isinstance(row.get(term), (int, float)):
                    by_step.setdefault(term, []).append(float(row[term]))
    terms = [t for t in LOSS_TERMS if any(t in v for c in curves.values() for v in c.values())]
    if not terms:
        return None
    cols = min(3, len(terms))
    nrows = math.ceil(len(terms) / cols)
    fig = _figure(4.5 * cols, 3.2 * nrows)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    # One colour per run name across every panel (a panel may lack some runs' terms).
    palette = matplotlib_colors(len(curves))
    colour = {name: palette[i] for i, name in enumerate(sorted(curves))}
    for ax, term in zip(axes, terms):
        values: list[float] = []
        for name in sorted(curves):
            pts = [(s, statistics.fmean(v[term])) for s, v in sorted(curves[name].items()) if term in v]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=colour[name])
                values += [p[1] for p in pts]
        if values:  # a nearly constant curve: an axis 1% of its size wide, not a magnified 1e-6
            lo, hi = min(values), max(values)
            ax.set_ylim(*padded_range(lo, hi, min_span=0.01 * max(abs(lo), abs(hi)) or 1e-6))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set(title=term, xlabel="step")
        ax.grid(alpha=0.3)
    for ax in axes[len(terms):]:
        ax.set_axis_off()
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour[n], label=n) for n in sorted(curves)]
    if handles:
        fig.legend(handles, [h.get_label() for h in handles], loc="outside right upper", fontsize=7)
    return fig


def plot_kv_cosine(run: dict, path: Path) -> Path | None:
    """Heatmap of the run folder's ``kv_cosine.json`` ([layers][slots] cosines); None if it has none."""
    from matplotlib.ticker import MaxNLocator

    src = Path(run["path"]) / "kv_cosine.json"
    if not src.is_file():
        return None
    try:
        grid = json.loads(src.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: not valid JSON ({e})") from None
    if not (isinstance(grid, list) and grid and all(isinstance(row, list) and len(row) == len(grid[0]) for row in grid)):
        raise ValueError(f"{src}: expected a non-empty [layers][slots] list of lists of equal length")
    grid = [[float("nan") if v is None else float(v) for v in row] for row in grid]  # None: an unfilled slot
    fig = _figure(max(4.0, 0.35 * len(grid[0]) + 2), max(3.0, 0.3 * len(grid) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=-1, vmax=1, origin="lower")
    ax.set(title=f"teacher-student KV cosine: {run['name']} seed {run['seed']}", xlabel="latent slot", ylabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


# --- instruments ---------------------------------------------------------------------------


def plot_instruments(runs: Sequence[dict], path: Path) -> Path | None:
    """Over training, a line per run name (mean over seeds): the logit-lens score and the share of
    held-out examples whose latent KV is closer to their own teacher target than to a neighbour's."""
    series: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in runs:
        for row in run.get("instruments") or []:
            for key, value in (("lens", lens_score(row)), ("own", alignment(row, "own_below_neighbour"))):
                if value is not None:
                    series.setdefault(key, {}).setdefault(run["name"], {}).setdefault(int(row["step"]), []).append(100 * value)
    if not series:
        return None
    names = sorted({n for s in series.values() for n in s})
    palette = matplotlib_colors(len(names))
    colour = dict(zip(names, palette))
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    titles = {"lens": "logit lens: slots decoding their step's result (%)", "own": "KV closer to own target than a neighbour's (%)"}
    for ax, key in zip(axes, ("lens", "own")):
        for name, by_step in sorted(series.get(key, {}).items()):
            steps = sorted(by_step)
            ax.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker="o", ms=3, label=name, color=colour[name])
        if key == "own":
            ax.axhline(50, color="grey", lw=0.8, ls="--")
        ax.set(title=titles[key], xlabel="step")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    fig.legend([Line2D([], [], color=colour[n]) for n in names], names, loc="outside right upper", fontsize=7)
    return _save(fig, path)


def plot_logit_lens_slots(runs: Sequence[dict], path: Path) -> Path | None:
    """At the last measurement, the logit-lens score per latent slot: a line per run name (mean over seeds)."""
    per: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        rows = run.get("instruments") or []
        if not rows:
            continue
        for slot in (rows[-1].get("logit_lens") or {}).get("slots", []):
            if slot.get("aligned") is not None:
                per.setdefault(run["name"], {}).setdefault(int(slot["slot"]), []).append(100 * slot["aligned"])
    if not per:
        return None
    fig = _figure(6, 3.6)
    ax = fig.subplots()
    for name, by_slot in sorted(per.items()):
        slots = sorted(by_slot)
        ax.plot(slots, [statistics.fmean(by_slot[j]) for j in slots], marker="o", label=name)
    ax.set(title="logit lens per latent slot (last measurement)", xlabel="latent slot", ylabel="decodes its step's result (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_selector_keeps(runs: Sequence[dict], path: Path) -> Path | None:
    """One panel per dataset (trace style): stacked bars of the share of each selector's kept slots
    per token type (mean over that dataset's runs that wrote ``selector_keeps.json``), the CoT's own
    mix as the first bar, and the share of result tokens each keeps written beside its bar."""
    by_ds = selector_keeps_by_dataset(runs)
    if not by_ds:
        return None
    names = sorted({n for d in by_ds.values() for n in d["shares"]}, key=lambda n: (n != "_cot", n))
    types = [t for t in dict.fromkeys(t for d in by_ds.values() for n in names for t in d["shares"].get(n, {}))
             if any(d["shares"].get(n, {}).get(t, 0) > 0 for d in by_ds.values() for n in names)]
    colour = dict(zip(types, matplotlib_colors(len(types))))
    fig = _figure(8 * len(by_ds), 0.45 * len(names) + 1.8)
    axes = fig.subplots(1, len(by_ds), squeeze=False)[0]
    for ax, (ds, d) in zip(axes, by_ds.items()):
        left = [0.0] * len(names)
        for t in types:
            vals = [100 * d["shares"].get(n, {}).get(t, 0.0) for n in names]
            ax.barh(range(len(names)), vals, left=left, color=colour[t], label=t)
            left = [a + b for a, b in zip(left, vals)]
        for i, n in enumerate(names):
            if n in d["recall"]:
                ax.annotate(f"keeps {100 * d['recall'][n]:.0f}% of results", (101, i), va="center", fontsize=7)
        ax.set_yticks(range(len(names)), ["CoT (all tokens)" if n == "_cot" else n for n in names])
        at = "step 0 (the starting teacher)" if d["steps"] == [0] else f"step {', '.join(map(str, d['steps']))}"
        ax.set(title=f"{ds}: share of kept slots per token type\n({d['runs']} runs, measured at {at})",
               xlabel="% of kept slots", xlim=(0, 135))
        ax.invert_yaxis()
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[t], label=t) for t in types]
    fig.legend(handles, types, fontsize=7, loc="outside lower center", ncol=min(len(types), 8))
    return _save(fig, path)


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


HEATMAPS = ("all", "first-seed", "none")
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


def _heatmap_runs(runs: Sequence[dict], which: str) -> list[dict]:
    if which == "none":
        return []
    if which == "all":
        return list(runs)
    first: dict[str, dict] = {}
    for r in runs:
        if r["name"] not in first or (r["seed"] or 0) < (first[r["name"]]["seed"] or 0):
            first[r["name"]] = r
    return list(first.values())


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

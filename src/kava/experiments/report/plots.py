"""The report's plots (matplotlib, imported when a plot is drawn; Agg canvas, no display needed):
accuracy against forward passes, training curves (loss terms against step, mean over seeds), the
instruments over training, the logit lens per latent slot, what each selector keeps and, for
every run folder that holds a ``kv_cosine.json`` (a ``[layers][slots]`` list of teacher-student
cosine similarities), a heatmap of it. Run folders without that file are skipped silently."""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...io import atomic_write
from .collect import read_history
from .instruments import alignment, lens_score, selector_keeps_by_dataset
from .tables import row_labels

LOSS_TERMS = ("loss", "ce_student", "ce_teacher", "codi", "kv", "kv_cos", "latent_ce")
HEATMAPS = ("all", "first-seed", "none")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")


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
            ax.errorbar(
                r["forward_passes_mean"],
                acc,
                xerr=r["forward_passes_std"] or 0.0,
                yerr=yerr,
                fmt="o",
                capsize=3,
                color=colour[labels[(r["name"], r["mode"])]],
                clip_on=False,
            )
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
    for ax in axes[len(terms) :]:
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
    if not (
        isinstance(grid, list) and grid and all(isinstance(row, list) and len(row) == len(grid[0]) for row in grid)
    ):
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


def plot_instruments(runs: Sequence[dict], path: Path) -> Path | None:
    """Over training, a line per run name (mean over seeds): the logit-lens score and the share of
    held-out examples whose latent KV is closer to their own teacher target than to a neighbour's."""
    series: dict[str, dict[str, dict[int, list[float]]]] = {}
    for run in runs:
        for row in run.get("instruments") or []:
            for key, value in (("lens", lens_score(row)), ("own", alignment(row, "own_below_neighbour"))):
                if value is not None:
                    series.setdefault(key, {}).setdefault(run["name"], {}).setdefault(int(row["step"]), []).append(
                        100 * value
                    )
    if not series:
        return None
    names = sorted({n for s in series.values() for n in s})
    palette = matplotlib_colors(len(names))
    colour = dict(zip(names, palette))
    fig = _figure(10, 3.6)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    titles = {
        "lens": "logit lens: slots decoding their step's result (%)",
        "own": "KV closer to own target than a neighbour's (%)",
    }
    for ax, key in zip(axes, ("lens", "own")):
        for name, by_step in sorted(series.get(key, {}).items()):
            steps = sorted(by_step)
            ax.plot(
                steps, [statistics.fmean(by_step[s]) for s in steps], marker="o", ms=3, label=name, color=colour[name]
            )
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
    ax.set(
        title="logit lens per latent slot (last measurement)",
        xlabel="latent slot",
        ylabel="decodes its step's result (%)",
    )
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
    types = [
        t
        for t in dict.fromkeys(t for d in by_ds.values() for n in names for t in d["shares"].get(n, {}))
        if any(d["shares"].get(n, {}).get(t, 0) > 0 for d in by_ds.values() for n in names)
    ]
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
        ax.set(
            title=f"{ds}: share of kept slots per token type\n({d['runs']} runs, measured at {at})",
            xlabel="% of kept slots",
            xlim=(0, 135),
        )
        ax.invert_yaxis()
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[t], label=t) for t in types]
    fig.legend(handles, types, fontsize=7, loc="outside lower center", ncol=min(len(types), 8))
    return _save(fig, path)


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


def write_plots(runs: Sequence[dict], rows: Sequence[dict], out: Path, heatmaps: str) -> list[Path]:
    """Every plot the runs allow, written to ``out``; the files written, in the report's order.
    ``heatmaps``: ``all`` (a KV cosine heatmap per run), ``first-seed`` (per name, its lowest seed's) or ``none``."""
    made = (
        plot_accuracy_vs_passes(rows, out / "accuracy_vs_forward_passes.png"),
        plot_training_curves(runs, out / "training_curves.png"),
        plot_instruments(runs, out / "instruments.png"),
        plot_logit_lens_slots(runs, out / "logit_lens_slots.png"),
        plot_selector_keeps(runs, out / "selector_keeps.png"),
        *(
            plot_kv_cosine(r, out / f"kv_cosine_{_UNSAFE.sub('_', r['name'])}_seed{r['seed']}.png")
            for r in _heatmap_runs(runs, heatmaps)
        ),
    )
    return [p for p in made if p is not None]

"""Results of many runs: tables (CSV, Markdown, LaTeX), plots and a verdict on each claim.

A run is any folder under ``runs_dir`` holding a ``status.json``. Its name is the folder
above ``seedN`` (so the seeds of ``runs/abl/rkv/seed0..2`` form the run ``rkv``); a folder
not called ``seedN`` is a run of its own (its seed read from ``config.yaml``). The method is
the name up to an ``@`` (``rkv@nl`` is the method ``rkv``, see :mod:`kava.experiments.sweep`); the
dataset is the config's ``data.eval``, written ``train→eval`` when ``data.train`` is not the
same name. Over the seeds of one name, dataset and eval mode, accuracy and forward passes
are given as mean and sample std (0 for one seed).

Accuracies are fractions in ``results.csv`` and ``verdicts.json``, percentages in the
Markdown and LaTeX tables and in the verdict text.

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

from ..io import atomic_write, atomic_write_json, atomic_write_text

log = logging.getLogger("kava.report")  # the name its log lines have always had

HOLDS, FAILS, UNMEASURED = "holds", "does not hold", "not measured"
LOSS_TERMS = ("loss", "ce_student", "ce_teacher", "codi", "kv", "kv_cos", "latent_ce")
_SEED_DIR = re.compile(r"seed(\d+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]+")
_EVAL_FIELDS = ("accuracy", "forward_passes", "generated_tokens", "kv_cache_bytes", "peak_kv_cache_bytes", "wall_time_s")


# --- collecting ---------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def read_history(run_dir: str | Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` by step; where a resumed run logged a step twice, the last row wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def dataset_label(train_data: str, eval_data: str) -> str:
    """``eval`` when it is the training data's name too, else ``train→eval``."""
    return eval_data if train_data == eval_data or not train_data else f"{train_data}→{eval_data}"


def method_of(name: str) -> str:
    """The method a run name stands for: the part before an ``@``."""
    return name.split("@", 1)[0]


def collect_runs(runs_dir: str | Path) -> list[dict]:
    """One record per run folder under ``runs_dir`` (any folder with a ``status.json``).

    Keys: name, method, seed, path, state, step, max_steps, error, train_data, eval_data,
    dataset, mode (train.mode), config (the raw ``config.yaml`` mapping), eval
    (``{mode: metrics}`` from ``eval_metrics.json``, else from ``status.json``) and
    last_metrics (the last ``metrics.jsonl`` row, else ``status["train"]``).
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    records = []
    for status_path in sorted(root.rglob("status.json")):
        run_dir = status_path.parent
        rel = run_dir.relative_to(root)
        if any(part.startswith(".") or part.startswith("checkpoint-") for part in rel.parts):
            continue
        status = _read_json(status_path) or {}
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        config = config or {}
        seed_match = _SEED_DIR.fullmatch(run_dir.name)
        if seed_match and rel.parent.parts:
            name, seed = rel.parent.as_posix(), int(seed_match.group(1))
        else:
            name = rel.as_posix() if rel.parts else root.resolve().name
            seed = int(config.get("train", {}).get("seed", 0))
        data = config.get("data", {})
        train_data, eval_data = str(data.get("train", "")), str(data.get("eval", "unknown"))
        history = read_history(run_dir)
        records.append({
            "name": name, "method": method_of(name), "seed": seed, "path": str(run_dir),
            "state": status.get("state", "unknown"), "step": status.get("step"), "max_steps": status.get("max_steps"),
            "error": status.get("error", ""), "train_data": train_data, "eval_data": eval_data,
            "dataset": dataset_label(train_data, eval_data), "mode": config.get("train", {}).get("mode", ""),
            "config": config, "eval": _read_json(run_dir / "eval_metrics.json") or status.get("eval") or {},
            "last_metrics": history[-1] if history else status.get("train") or {},
        })
    return records


# --- aggregation --------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (0 for one value; None, None for none)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def aggregate(runs: Iterable[dict]) -> list[dict]:
    """One row per (name, dataset, eval mode) over the seeds that have that evaluation.

    Row keys: name, method, dataset, train_data, eval_data, mode, n (seeds), seeds, and
    ``<field>_mean`` / ``<field>_std`` for accuracy, forward_passes, generated_tokens,
    kv_cache_bytes, peak_kv_cache_bytes and wall_time_s; n_examples (eval examples per seed)
    and unfinished (seeds of this name and dataset without a finished state).
    """
    runs = list(runs)
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for run in runs:
        for mode, metrics in (run["eval"] or {}).items():
            groups.setdefault((run["name"], run["dataset"], mode), []).append({"run": run, "metrics": metrics})
    rows = []
    for (name, dataset, mode), items in sorted(groups.items()):
        first = items[0]["run"]
        row: dict[str, Any] = {
            "name": name, "method": method_of(name), "dataset": dataset, "train_data": first["train_data"],
            "eval_data": first["eval_data"], "mode": mode, "n": len(items),
            "seeds": sorted(i["run"]["seed"] for i in items),
        }
        for f in _EVAL_FIELDS:
            row[f"{f}_mean"], row[f"{f}_std"] = mean_std([i["metrics"].get(f) for i in items])
        row["n_examples"] = min(int(i["metrics"].get("n", 0)) for i in items)
        row["unfinished"] = sum(1 for r in runs if r["name"] == name and r["dataset"] == dataset and r["state"] != "finished")
        rows.append(row)
    return rows


def sem(row: dict, field_name: str = "accuracy") -> float:
    """Standard error of the mean of ``field_name`` in an aggregated row."""
    std = row.get(f"{field_name}_std") or 0.0
    return std / math.sqrt(row["n"]) if row["n"] else 0.0


# --- claims -------------------------------------------------------------------------------


@dataclass
class ClaimNames:
    """Which run methods stand for the roles the claims name, and which datasets pair up.

    ``methods[role]`` lists method names (the first one present is used). ``nl_pairs`` is
    a list of ``(equation dataset, natural-language dataset)`` labels; left empty, every
    dataset label containing ``-nl`` is paired with the same label without it.
    """

    methods: dict[str, tuple[str, ...]] = field(default_factory=lambda: {
        "codi": ("codi",), "kava": ("kava", "rkv"), "right_crop": ("right_crop",),
        "mean_pool": ("mean_pool",), "shuffled": ("shuffled",),
    })
    nl_pairs: list[tuple[str, str]] = field(default_factory=list)
    mode: str = "student"


@dataclass
class Verdict:
    """One claim checked against the table: status is ``holds``, ``does not hold`` or ``not measured``."""

    claim: str
    statement: str
    status: str
    details: list[str] = field(default_factory=list)
    exceeds_se: bool | None = None
    """Whether every difference behind the verdict exceeds its combined standard error."""

    def text(self) -> str:
        head = f"({self.claim}) {self.statement}: **{self.status}**"
        if self.exceeds_se is not None:
            if self.exceeds_se:
                head += " (every difference exceeds the combined standard error)"
            elif self.status == HOLDS:
                head += " in the means only: not every difference exceeds the combined standard error"
            else:
                head += " (not every difference exceeds the combined standard error)"
        return "\n".join([head, *(f"  - {d}" for d in self.details)])


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _cell(row: dict) -> str:
    return f"{row['name']} {_pct(row['accuracy_mean'])} ± {_pct(row['accuracy_std'])} (n={row['n']})"


class _Table:
    """Lookup of aggregated rows by role and dataset for one eval mode."""

    def __init__(self, rows: Sequence[dict], names: ClaimNames):
        self.names = names
        self.rows = [r for r in rows if r["mode"] == names.mode and r["accuracy_mean"] is not None]
        self.datasets = sorted({r["dataset"] for r in self.rows})

    def get(self, role: str, dataset: str) -> dict | None:
        for method in self.names.methods.get(role, (role,)):
            hits = [r for r in self.rows if r["method"] == method and r["dataset"] == dataset]
            if hits:
                return min(hits, key=lambda r: len(r["name"]))  # the plain name before name@variant
        return None


def _beats(table: _Table, winner: str, loser: str) -> tuple[list[str], list[bool], list[bool]]:
    """For every dataset with both roles: a detail line, whether winner > loser, whether it exceeds the SE."""
    details, holds, exceeds = [], [], []
    for ds in table.datasets:
        a, b = table.get(winner, ds), table.get(loser, ds)
        if a is None or b is None:
            continue
        diff = a["accuracy_mean"] - b["accuracy_mean"]
        ok, note = _against_se(diff, [a, b])
        holds.append(diff > 0)
        exceeds.append(ok)
        details.append(f"{ds}: {_cell(a)} vs {_cell(b)}: difference {100 * diff:+.1f}, {note}")
    return details, holds, exceeds


def _against_se(diff: float, cells: Sequence[dict]) -> tuple[bool, str]:
    """Whether ``|diff|`` exceeds the combined standard error of ``cells``, and words saying so.

    With a single seed on either side there is no error estimate: that never counts as exceeding.
    """
    if any(c["n"] < 2 for c in cells):
        return False, "no standard error (a single seed)"
    se = math.sqrt(sum(sem(c) ** 2 for c in cells))
    return abs(diff) > se, f"combined SE {100 * se:.1f} ({'exceeds' if abs(diff) > se else 'within'} it)"


def _verdict(claim: str, statement: str, details: list[str], holds: list[bool], exceeds: list[bool], missing: str) -> Verdict:
    if not holds:
        return Verdict(claim, statement, UNMEASURED, [missing])
    return Verdict(claim, statement, HOLDS if all(holds) else FAILS, details, all(exceeds))


def _nl_pairs(table: _Table) -> list[tuple[str, str]]:
    if table.names.nl_pairs:
        return [tuple(p) for p in table.names.nl_pairs]  # type: ignore[misc]
    present = set(table.datasets)
    return [(ds.replace("-nl", "", 1), ds) for ds in table.datasets if "-nl" in ds and ds.replace("-nl", "", 1) in present]


def check_claims(rows: Sequence[dict], names: ClaimNames | None = None) -> list[Verdict]:
    """The four claims, each checked on every dataset where both sides were measured.

    A claim holds if it holds on every such dataset (by the means); the details give the
    numbers and whether each difference exceeds the combined standard error
    ``sqrt(se_a^2 + se_b^2)``, ``se = std / sqrt(seeds)``.
    """
    table = _Table(rows, names or ClaimNames())
    m = table.names.methods

    def who(role: str) -> str:
        return "/".join(m.get(role, (role,)))

    out = []
    d, h, e = _beats(table, "kava", "codi")
    out.append(_verdict("1", "KV distillation beats CODI-only", d, h, e, f"needs {who('kava')} and {who('codi')} on one dataset"))

    d, h, e = [], [], []
    for loser in ("right_crop", "mean_pool"):
        dd, hh, ee = _beats(table, "kava", loser)
        d, h, e = d + dd, h + hh, e + ee
    v = _verdict("2", "R-KV selection beats right-crop and mean-pool", d, h, e,
                 f"needs {who('kava')} and {who('right_crop')} or {who('mean_pool')} on one dataset")
    for loser in ("right_crop", "mean_pool"):
        if v.status != UNMEASURED and not any(table.get(loser, ds) for ds in table.datasets):
            v.details.append(f"{who(loser)} not measured: only the other baseline was compared")
    out.append(v)

    d, h, e = _beats(table, "kava", "shuffled")
    out.append(_verdict("3", "shuffled teacher KV does worse than R-KV", d, h, e,
                        f"needs {who('kava')} and {who('shuffled')} on one dataset"))

    d, h, e = [], [], []
    for eq, nl in _nl_pairs(table):
        cells = [table.get(role, ds) for role in ("kava", "codi") for ds in (eq, nl)]
        if any(c is None for c in cells):
            continue
        k_eq, k_nl, c_eq, c_nl = cells
        drop_k = k_eq["accuracy_mean"] - k_nl["accuracy_mean"]
        drop_c = c_eq["accuracy_mean"] - c_nl["accuracy_mean"]
        diff = drop_c - drop_k
        ok, note = _against_se(diff, cells)
        h.append(drop_k < drop_c)
        e.append(ok)
        d.append(f"{eq} → {nl}: drop with {k_eq['name']} {100 * drop_k:+.1f}"
                 f" ({_pct(k_eq['accuracy_mean'])} → {_pct(k_nl['accuracy_mean'])}),"
                 f" with {c_eq['name']} {100 * drop_c:+.1f} ({_pct(c_eq['accuracy_mean'])} → {_pct(c_nl['accuracy_mean'])});"
                 f" difference {100 * diff:+.1f}, {note}")
    out.append(_verdict("4", "the drop from equation to natural-language traces is smaller with KaVa than with CODI", d, h, e,
                        f"needs {who('kava')} and {who('codi')} on an equation dataset and its -nl counterpart"))
    return out


# --- tables -------------------------------------------------------------------------------


def _row_labels(rows: Sequence[dict], by: str = "method") -> dict[tuple[str, str], str]:
    """Table row label of each (method or name, mode): itself, plus the mode where it has several."""
    modes: dict[str, set[str]] = {}
    for r in rows:
        modes.setdefault(r[by], set()).add(r["mode"])
    return {(r[by], r["mode"]): r[by] if len(modes[r[by]]) == 1 else f"{r[by]} [{r['mode']}]" for r in rows}


def table_layout(rows: Sequence[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """Rows x columns of the results table: row labels, dataset labels, and the cells by (label, dataset).

    Rows are methods; where two run names of one method share a dataset (``rkv`` and
    ``rkv@x`` both on the same data), rows are run names instead.
    """
    for by in ("method", "name"):
        labels = _row_labels(rows, by)
        cells = {(labels[(r[by], r["mode"])], r["dataset"]): r for r in rows}
        if len(cells) == len(rows):
            break
    return sorted({k[0] for k in cells}), sorted({r["dataset"] for r in rows}), cells


def _acc_pm(r: dict | None) -> str:
    return "--" if r is None or r["accuracy_mean"] is None else f"{_pct(r['accuracy_mean'])} ± {_pct(r['accuracy_std'])}"


def _fp(r: dict | None) -> str:
    return "--" if r is None or r["forward_passes_mean"] is None else f"{r['forward_passes_mean']:.1f}"


CSV_FIELDS = ["method", "name", "dataset", "train_data", "eval_data", "mode", "n", "seeds", "n_examples", "unfinished",
              *[f"{f}_{s}" for f in _EVAL_FIELDS for s in ("mean", "std")]]


def to_csv(rows: Sequence[dict]) -> str:
    """The aggregated rows as CSV (accuracies as fractions)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (" ".join(map(str, r[k])) if k == "seeds" else r[k]) for k in CSV_FIELDS})
    return buf.getvalue()


def to_markdown(rows: Sequence[dict]) -> str:
    """Table 1 layout: a row per method; per dataset, accuracy (%) mean ± std and forward passes.

    The last column gives the seeds behind each row (per dataset, in column order, where they differ).
    """
    methods, datasets, cells = table_layout(rows)
    if not methods:
        return "_no evaluated runs_\n"
    head = ["Method", *[f"{ds} {what}" for ds in datasets for what in ("acc. (%)", "# FP")], "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        ns = [str(cells[(m, ds)]["n"]) for ds in datasets if (m, ds) in cells]
        vals = [v for ds in datasets for v in (_acc_pm(cells.get((m, ds))), _fp(cells.get((m, ds))))]
        lines.append("| " + " | ".join([m, *vals, ns[0] if len(set(ns)) == 1 else "/".join(ns)]) + " |")
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
        "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "→": r"$\to$", "±": r"$\pm$"}


def _tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX.get(c, c) for c in text)


def to_latex(rows: Sequence[dict], caption: str = "Accuracy (\\%, mean $\\pm$ std over seeds) and forward passes (\\# FP).") -> str:
    """A LaTeX table laid out like the paper's Table 1 (needs ``\\usepackage{booktabs}``); best accuracy per dataset in bold."""
    methods, datasets, cells = table_layout(rows)
    best = {}
    for ds in datasets:
        accs = [cells[(m, ds)]["accuracy_mean"] for m in methods if (m, ds) in cells and cells[(m, ds)]["accuracy_mean"] is not None]
        best[ds] = max(accs) if accs else None
    lines = ["% written by `kava report`; needs \\usepackage{booktabs}", "\\begin{table}[t]", "\\centering",
             "\\begin{tabular}{l" + " cc" * len(datasets) + "}", "\\toprule"]
    lines.append(" & " + " & ".join(f"\\multicolumn{{2}}{{c}}{{{_tex(ds)}}}" for ds in datasets) + " \\\\")
    lines.append(" ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(datasets))))
    lines.append("Method" + " & Acc. (\\%) & \\# FP" * len(datasets) + " \\\\")
    lines.append("\\midrule")
    for m in methods:
        vals = []
        for ds in datasets:
            r = cells.get((m, ds))
            acc = _tex(_acc_pm(r))
            if r is not None and r["accuracy_mean"] is not None and r["accuracy_mean"] == best[ds]:
                acc = f"\\textbf{{{acc}}}"
            vals += [acc, _fp(r)]
        lines.append(" & ".join([_tex(m), *vals]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\label{tab:kava-results}", "\\end{table}", ""]
    return "\n".join(lines)


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
    labels = _row_labels(rows, "name")
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


# --- the report ---------------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`write_report` produced."""

    runs: list[dict]
    rows: list[dict]
    verdicts: list[Verdict]
    files: list[Path]


def to_report_markdown(runs: Sequence[dict], rows: Sequence[dict], verdicts: Sequence[Verdict]) -> str:
    """``results.md``: the table, the verdicts and the runs that did not finish."""
    parts = ["# Results", "", f"{len(runs)} run folder(s), {len(rows)} (method, dataset, mode) group(s).",
             "Accuracy in %, mean ± sample std over seeds; # FP: forward passes per question.", "", to_markdown(rows),
             "## Claims", ""]
    parts += [v.text() + "\n" for v in verdicts]
    bad = [r for r in runs if r["state"] != "finished"]
    if bad:
        parts += ["## Runs not finished", ""]
        parts += [f"- {r['name']} seed {r['seed']}: {r['state']}" + (f" ({r['error']})" if r["error"] else "") for r in bad]
        parts.append("")
    return "\n".join(parts)


def write_report(runs_dir: str | Path, out_dir: str | Path | None = None, names: ClaimNames | None = None) -> Report:
    """Collect the runs under ``runs_dir`` and write the report to ``out_dir`` (default ``runs_dir/report``).

    Files: ``results.csv``, ``runs.csv`` (one row per run), ``results.md``, ``results.tex``,
    ``verdicts.json``, ``accuracy_vs_forward_passes.png``, ``training_curves.png`` and a
    ``kv_cosine_<name>_seed<N>.png`` per run folder with a ``kv_cosine.json``.
    """
    runs = collect_runs(runs_dir)
    rows = aggregate(runs)
    verdicts = check_claims(rows, names)
    out = Path(out_dir) if out_dir else Path(runs_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    files = []

    def text(name: str, content: str) -> None:
        atomic_write_text(out / name, content)
        files.append(out / name)

    text("results.csv", to_csv(rows))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "seed", "dataset", "state", "step", "max_steps", "mode", "accuracy", "forward_passes", "final_loss",
                "error", "path"])
    for r in runs:
        for mode, m in sorted((r["eval"] or {"": {}}).items()):
            w.writerow([r["name"], r["seed"], r["dataset"], r["state"], r["step"], r["max_steps"], mode, m.get("accuracy"),
                        m.get("forward_passes"), r["last_metrics"].get("loss"), r["error"], r["path"]])
    text("runs.csv", buf.getvalue())
    text("results.md", to_report_markdown(runs, rows, verdicts))
    text("results.tex", to_latex(rows))
    atomic_write_json(out / "verdicts.json", [asdict(v) for v in verdicts])
    files.append(out / "verdicts.json")
    for made in (plot_accuracy_vs_passes(rows, out / "accuracy_vs_forward_passes.png"),
                 plot_training_curves(runs, out / "training_curves.png"),
                 *(plot_kv_cosine(r, out / f"kv_cosine_{_UNSAFE.sub('_', r['name'])}_seed{r['seed']}.png") for r in runs)):
        if made is not None:
            files.append(made)
    log.info("report on %d run(s) written to %s", len(runs), out)
    return Report(runs, rows, verdicts, files)


__all__ = [
    "ClaimNames", "Report", "Verdict", "aggregate", "check_claims", "collect_runs", "dataset_label", "mean_std", "method_of",
    "plot_accuracy_vs_passes", "plot_kv_cosine", "plot_training_curves", "read_history", "sem", "table_layout", "to_csv",
    "to_latex", "to_markdown", "write_report",
]

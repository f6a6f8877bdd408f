"""The report's tables: the aggregated rows as CSV, as Markdown laid out like the paper's Table 1
and as LaTeX; the per-run and per-evaluation CSVs; and the Markdown tables that describe the
data (statistics per group, each arm against CODI-only and R-KV, with two-sided p-values) and
test no claim."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

from .. import stats
from .aggregate import EVAL_FIELDS
from .claims import ClaimNames, RoleTable, successes
from .collect import RUNS_CSV_FIELDS
from .fmt import acc_pm, percent, pval


def row_labels(rows: Sequence[dict], by: str = "method") -> dict[tuple[str, str], str]:
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
        labels = row_labels(rows, by)
        cells = {(labels[(r[by], r["mode"])], r["dataset"]): r for r in rows}
        if len(cells) == len(rows):
            break
    return sorted({k[0] for k in cells}), sorted({r["dataset"] for r in rows}), cells


def _fp(r: dict | None) -> str:
    return "--" if r is None or r["forward_passes_mean"] is None else f"{r['forward_passes_mean']:.1f}"


CSV_FIELDS = [
    "method",
    "name",
    "dataset",
    "train_data",
    "eval_data",
    "mode",
    "n",
    "seeds",
    "n_examples",
    "unfinished",
    *[f"{f}_{s}" for f in EVAL_FIELDS for s in ("mean", "std")],
]


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
        vals = [v for ds in datasets for v in (acc_pm(cells.get((m, ds))), _fp(cells.get((m, ds))))]
        lines.append("| " + " | ".join([m, *vals, ns[0] if len(set(ns)) == 1 else "/".join(ns)]) + " |")
    return "\n".join(lines) + "\n"


_TEX = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "→": r"$\to$",
    "±": r"$\pm$",
}


def _tex(text: str) -> str:
    """``text`` with LaTeX's special characters escaped."""
    return "".join(_TEX.get(c, c) for c in text)


def to_latex(
    rows: Sequence[dict], caption: str = "Accuracy (\\%, mean $\\pm$ std over seeds) and forward passes (\\# FP)."
) -> str:
    """A LaTeX table laid out like the paper's Table 1 (needs ``\\usepackage{booktabs}``); best
    accuracy per dataset in bold."""
    methods, datasets, cells = table_layout(rows)
    best = {}
    for ds in datasets:
        accs = [
            cells[(m, ds)]["accuracy_mean"]
            for m in methods
            if (m, ds) in cells and cells[(m, ds)]["accuracy_mean"] is not None
        ]
        best[ds] = max(accs) if accs else None
    lines = [
        "% written by `kava report`; needs \\usepackage{booktabs}",
        "\\begin{table}[t]",
        "\\centering",
        "\\begin{tabular}{l" + " cc" * len(datasets) + "}",
        "\\toprule",
    ]
    lines.append(" & " + " & ".join(f"\\multicolumn{{2}}{{c}}{{{_tex(ds)}}}" for ds in datasets) + " \\\\")
    lines.append(" ".join(f"\\cmidrule(lr){{{2 + 2 * i}-{3 + 2 * i}}}" for i in range(len(datasets))))
    lines.append("Method" + " & Acc. (\\%) & \\# FP" * len(datasets) + " \\\\")
    lines.append("\\midrule")
    for m in methods:
        vals = []
        for ds in datasets:
            r = cells.get((m, ds))
            acc = _tex(acc_pm(r))
            if r is not None and r["accuracy_mean"] is not None and r["accuracy_mean"] == best[ds]:
                acc = f"\\textbf{{{acc}}}"
            vals += [acc, _fp(r)]
        lines.append(" & ".join([_tex(m), *vals]) + " \\\\")
    lines += [
        "\\bottomrule",
        "\\end{tabular}",
        f"\\caption{{{caption}}}",
        "\\label{tab:kava-results}",
        "\\end{table}",
        "",
    ]
    return "\n".join(lines)


def to_runs_csv(runs: Sequence[dict]) -> str:
    """``runs.csv``: a row per run and eval mode (one row with no mode for a run not evaluated)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RUNS_CSV_FIELDS)
    for r in runs:
        for mode, m in sorted((r["eval"] or {"": {}}).items()):
            w.writerow(
                [
                    r["name"],
                    r["seed"],
                    r["dataset"],
                    r["state"],
                    r["step"],
                    r["max_steps"],
                    mode,
                    m.get("accuracy"),
                    m.get("forward_passes"),
                    r["last_metrics"].get("loss"),
                    r["error"],
                    r["path"],
                ]
            )
    return buf.getvalue()


def to_curves_csv(runs: Sequence[dict]) -> str:
    """``curves.csv``: each run's held-out accuracy at every evaluation during training and at the end."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "seed", "dataset", "mode", "step", "accuracy"])
    for r in runs:
        for mode, points in sorted(r.get("curves", {}).items()):
            w.writerows([r["name"], r["seed"], r["dataset"], mode, step, acc] for step, acc in points)
    return buf.getvalue()


def statistics_table(rows: Sequence[dict], names: ClaimNames | None = None) -> str:
    """Markdown: per (name, dataset, mode), mean accuracy ± sample std with its seeded bootstrap
    95% interval, the worst seed, and the success rate (seeds at ``success_at`` or above) with
    its exact 95% interval."""
    names = names or ClaimNames()
    rows = [r for r in rows if r["accuracy_mean"] is not None]
    if not rows:
        return "_no evaluated runs_\n"
    lines = [
        f"| run | dataset | mode | seeds | acc. mean ± std (%) | 95% bootstrap CI | worst seed (%) |"
        f" successes (>= {percent(names.success_at)}%) | 95% exact CI |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vals = list(r["by_seed"].values())
        ci = stats.bootstrap_mean(vals)
        k, n = successes(r, names.success_at)
        lo, hi = stats.clopper_pearson(k, n)
        ci_text = "--" if ci is None else f"{percent(ci[0])} – {percent(ci[1])}"
        lines.append(
            f"| {r['name']} | {r['dataset']} | {r['mode']} | {n} | {acc_pm(r)} | {ci_text} | {percent(min(vals))} |"
            f" {k}/{n} | {percent(lo)} – {percent(hi)} |"
        )
    return "\n".join(lines) + "\n"


def paired_table(
    rows: Sequence[dict], names: ClaimNames | None = None, references: Sequence[str] = ("codi", "kava")
) -> str:
    """Markdown: every arm of a dataset against each reference role (``codi``, ``kava``; the
    method ``names`` gives it), paired by seed: the common seeds, the mean difference with its
    bootstrap 95% interval, and the two-sided p-value (the exact sign-flip test of
    :func:`kava.experiments.stats.compare`). A description of the data, not a claim: with many
    arms some p-values fall under any level by chance."""
    names = names or ClaimNames()
    table = RoleTable(rows, names)
    lines = []
    for ref_role in references:
        for dataset in table.datasets:
            ref = table.get(ref_role, dataset)
            if ref is None:
                continue
            for r in table.rows:
                if r["dataset"] != dataset or r["name"] == ref["name"]:
                    continue
                c = stats.compare(r["by_seed"], ref["by_seed"])
                if c is None:
                    continue
                ci = f"{100 * c.diff_ci[0]:+.1f} to {100 * c.diff_ci[1]:+.1f}" if c.paired and c.diff_ci else "--"
                common = len(c.seeds) if c.paired else "0 (unpaired)"
                lines.append(
                    f"| {r['name']} | {ref['name']} | {dataset} | {common} | {100 * c.mean_diff:+.1f} | {ci} |"
                    f" {pval(c.p_two_sided)} |"
                )
    if not lines:
        return ""
    head = [
        "| arm | against | dataset | common seeds | mean difference (points) | 95% bootstrap CI | p (two-sided) |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def _versus(row: dict, ref: dict | None) -> str:
    """``row`` against ``ref`` paired by seed: the mean difference in points with the two-sided
    p-value and the common seeds (``--``: itself or no reference)."""
    if ref is None or ref["name"] == row["name"]:
        return "--"
    c = stats.compare(row["by_seed"], ref["by_seed"])
    if c is None:
        return "--"
    n = len(c.seeds) if c.paired else "0, unpaired"
    return f"{100 * c.mean_diff:+.1f} (p = {pval(c.p_two_sided)}, n={n})"


def arms_table(rows: Sequence[dict], names: ClaimNames | None = None) -> str:
    """Markdown, one row per arm of the claims' eval mode: its seeds, accuracy mean ± std, worst
    seed, success rate with its exact 95% interval, and the arm against CODI-only and against
    R-KV of its dataset (:func:`_versus`: paired by seed, two-sided p-values).
    The comparisons describe the data; the claims are tested in their own section."""
    names = names or ClaimNames()
    table = RoleTable(rows, names)
    if not table.rows:
        return ""
    lines = [
        f"| arm | dataset | seeds | accuracy, mean ± std (%) | worst seed (%) | seeds >= {percent(names.success_at)}%"
        f" (95% CI) | vs {'/'.join(names.methods.get('codi', ('codi',)))} (two-sided p) |"
        f" vs {'/'.join(names.methods.get('kava', ('kava',)))} (two-sided p) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.rows:
        k, n = successes(r, names.success_at)
        lo, hi = stats.clopper_pearson(k, n)
        lines.append(
            f"| {r['name']} | {r['dataset']} | {n} | {acc_pm(r)} | {percent(min(r['by_seed'].values()))} |"
            f" {k}/{n} ({percent(lo)}-{percent(hi)}) | {_versus(r, table.get('codi', r['dataset']))} |"
            f" {_versus(r, table.get('kava', r['dataset']))} |"
        )
    return "\n".join(lines) + "\n"

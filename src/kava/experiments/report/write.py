"""The report as files: :func:`write_report` collects the runs, aggregates them over seeds, tests
the claims and writes the tables, ``results.md``, the verdicts and the plots;
:func:`rederive_report` writes ``results.md`` and the verdicts again from an earlier report's
``runs.csv``, for when its run folders are gone."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...io import atomic_write_json, atomic_write_text, check_output_folder
from .. import stats
from .aggregate import aggregate, area_rows
from .claims import ClaimNames, Verdict, check_claims
from .collect import collect_runs, collect_runs_csv
from .instruments import instruments_markdown, selector_keeps_markdown
from .plots import HEATMAPS, write_plots
from .tables import (
    arms_table,
    paired_table,
    statistics_table,
    to_csv,
    to_curves_csv,
    to_latex,
    to_markdown,
    to_runs_csv,
)

log = logging.getLogger("kava.report")  # the name its log lines have always had

CARRIED_SECTIONS = ("## Instruments", "## What each selector keeps")
"""Sections of ``results.md`` that need the run folders; :func:`rederive_report` carries them over."""


@dataclass
class Report:
    """What :func:`write_report` produced."""

    runs: list[dict]
    rows: list[dict]
    verdicts: list[Verdict]
    files: list[Path]
    skipped: list[str] = field(default_factory=list)
    """One line per run folder left out for a malformed file (naming it)."""


def to_report_markdown(
    runs: Sequence[dict], rows: Sequence[dict], verdicts: Sequence[Verdict], names: ClaimNames | None = None
) -> str:
    """``results.md``: the table, the statistics per group, the verdicts and the runs that did not finish."""
    # Kept whole (over 60 lines): the report page, section after section, as it reads.
    names = names or ClaimNames()
    parts = [
        "# Results",
        "",
        f"{len(runs)} run folder(s), {len(rows)} (method, dataset, mode) group(s).",
        "Accuracy in %, mean ± sample std over seeds; # FP: forward passes per question.",
        "",
        to_markdown(rows),
        "## Statistics",
        "",
        "Bootstrap: percentile, 9,999 resamples, seeded; success intervals: exact (Clopper-Pearson).",
        "",
        statistics_table(rows, names),
        "## Claims",
        "",
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
        " rates are given beside it.",
        "",
    ]
    parts += [v.text() + "\n" for v in verdicts]
    arms = arms_table(rows, names)
    if arms:
        parts += [
            "## Per arm",
            "",
            f"On the `{names.mode}` evaluation. Each arm against CODI-only and R-KV of its dataset, paired by seed:"
            " the mean difference in points, the two-sided p-value of the exact sign-flip test, and the common"
            " seeds. This describes the data; the claims above are the tests.",
            "",
            arms,
        ]
    paired = paired_table(rows, names)
    if paired:
        parts += [
            "## Every arm against CODI-only and R-KV",
            "",
            "Paired by seed, on the `" + names.mode + "` evaluation; two-sided p-values of the exact sign-flip"
            " test. This describes the data and tests no claim: across many arms, some p-values fall under"
            " any level by chance.",
            "",
            paired,
        ]
    inst = instruments_markdown(runs)
    if inst:
        parts += [inst]
    keeps = selector_keeps_markdown(runs)
    if keeps:
        parts += [keeps]
    bad = [r for r in runs if r["state"] != "finished"]
    if bad:
        parts += ["## Runs not finished", ""]
        parts += [
            f"- {r['name']} seed {r['seed']}: {r['state']}" + (f" ({r['error']})" if r["error"] else "") for r in bad
        ]
        parts.append("")
    return "\n".join(parts)


def secondary_markdown(verdicts: Sequence[Verdict]) -> str:
    """The claims tested on the secondary outcome, the area under the held-out accuracy curve."""
    parts = [
        "## Secondary outcome: area under the held-out accuracy curve",
        "",
        "The same claims and tests on each seed's mean held-out accuracy over training (the trapezoid rule over"
        " its evaluations, divided by the steps they span). A secondary outcome: no claim rests on it.",
        "",
    ]
    return "\n".join(parts + [v.text() + "\n" for v in verdicts])


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
    note = f"Re-derived by `kava report {Path(runs_csv).as_posix()}` from the per-seed accuracies in that file" + (
        "; the last sections need the run folders and are carried over from the report written from them."
        if carried
        else "."
    )
    md = f"{head}\n\n{note}\n\n{rest.rstrip()}\n" + "".join("\n" + c for c in carried)
    atomic_write_text(out / "results.md", md)
    atomic_write_json(out / "verdicts.json", [asdict(v) for v in verdicts])
    log.info("report on %d run(s) from %s re-derived in %s", len(runs), runs_csv, out)
    return Report(runs, rows, verdicts, [out / "results.md", out / "verdicts.json"])


def write_report(
    runs_dir: str | Path, out_dir: str | Path | None = None, names: ClaimNames | None = None, heatmaps: str = "all"
) -> Report:
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
    text("runs.csv", to_runs_csv(runs))
    text("curves.csv", to_curves_csv(runs))
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
    files += write_plots(runs, rows, out, heatmaps)
    log.info("report on %d run(s) written to %s", len(runs), out)
    return Report(runs, rows, verdicts, files, skipped)

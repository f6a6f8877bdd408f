"""What the runs' instruments measured, summarised for ``results.md``: the logit lens and the KV
alignment (``instruments.jsonl``, see :mod:`kava.distill.instruments`) and what each selector
keeps (``selector_keeps.json``)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from .aggregate import mean_std
from .fmt import percent


def lens_score(row: dict) -> float | None:
    return (row.get("logit_lens") or {}).get("aligned_mean")


def alignment(row: dict, key: str) -> float | None:
    return (row.get("kv_alignment") or {}).get(key)


def instrument_rows(runs: Sequence[dict]) -> list[dict]:
    """Per (name, dataset): the last instruments row of each seed, averaged: ``lens`` (logit-lens
    share of slots decoding their step's result), ``own_below_neighbour``, ``gap`` and
    ``own_below_slot_mean`` (KV alignment), with ``n`` seeds and whether they were held out."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run.get("instruments"):
            groups.setdefault((run["name"], run["dataset"]), []).append(run["instruments"][-1])
    out = []
    for (name, dataset), last in sorted(groups.items()):
        row = {
            "name": name,
            "dataset": dataset,
            "n": len(last),
            "held_out": all(r.get("held_out") for r in last),
            "step": max(r["step"] for r in last),
        }
        for key, get in (
            ("lens", lens_score),
            ("own_below_neighbour", lambda r: alignment(r, "own_below_neighbour")),
            ("gap", lambda r: alignment(r, "gap")),
            ("own_below_slot_mean", lambda r: alignment(r, "own_below_slot_mean")),
        ):
            row[key] = mean_std([get(r) for r in last])[0]
        out.append(row)
    return out


def instruments_markdown(runs: Sequence[dict]) -> str:
    """The instruments table of ``results.md`` (empty when no run wrote any)."""
    rows = instrument_rows(runs)
    if not rows:
        return ""
    f = lambda x, pct=True: "--" if x is None else (percent(x) if pct else f"{x:+.3f}")  # noqa: E731
    lines = [
        "## Instruments",
        "",
        "Last measurement of each seed, averaged. Logit lens: share of latent slots whose producing state decodes to "
        "its"
        " step's result. KV alignment (R-KV targets of the true teacher, layer-std L1): share of examples whose latent"
        " KV is closer to their own target than to a neighbour's (content transfer predicts well above 50%), the mean"
        " gap neighbour − own, and the share closer to their own target than to the batch slot mean.",
        "",
        "| run | dataset | seeds | held out | step | logit lens (%) | own < neighbour (%) | gap "
        "| own < slot mean (%) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['dataset']} | {r['n']} | {'yes' if r['held_out'] else 'no'} | {r['step']} | "
            f"{f(r['lens'])} |"
            f" {f(r['own_below_neighbour'])} | {f(r['gap'], False)} | {f(r['own_below_slot_mean'])} |"
        )
    return "\n".join(lines) + "\n"


def selector_keeps_by_dataset(runs: Sequence[dict]) -> dict[str, dict]:
    """Per dataset (trace style), over the runs that wrote ``selector_keeps.json``: ``runs``,
    ``steps`` (the steps they were measured at; 0 is the teacher the runs start from), ``shares``
    (``{selector: {token type: mean share}}``) and ``recall`` (``{selector: mean share of the result
    tokens kept}``). ``_cot`` is the CoT's own mix of token types."""
    out: dict[str, dict] = {}
    for run in runs:
        got = run.get("selector_keeps") or {}
        keeps = got.get("selectors") or {}
        if not keeps:
            continue
        ds = out.setdefault(run["dataset"], {"runs": 0, "steps": set(), "shares": {}, "recall": {}})
        ds["runs"] += 1
        if got.get("step") is not None:
            ds["steps"].add(int(got["step"]))
        for name, k in keeps.items():
            for t, v in (k.get("shares") or {}).items():
                if v is not None:
                    ds["shares"].setdefault(name, {}).setdefault(t, []).append(v)
            if k.get("result_recall") is not None:
                ds["recall"].setdefault(name, []).append(k["result_recall"])
    for ds in out.values():
        ds["steps"] = sorted(ds["steps"])
        ds["shares"] = {n: {t: statistics.fmean(v) for t, v in ts.items()} for n, ts in ds["shares"].items()}
        ds["recall"] = {n: statistics.fmean(v) for n, v in ds["recall"].items()}
    return dict(sorted(out.items()))


def selector_keeps_markdown(runs: Sequence[dict]) -> str:
    """The selector-keeps table of ``results.md``, one column per dataset (empty when no run wrote any)."""
    by_ds = selector_keeps_by_dataset(runs)
    if not by_ds:
        return ""
    names = sorted({n for d in by_ds.values() for n in d["recall"]})
    steps = sorted({s for d in by_ds.values() for s in d["steps"]})
    when = (
        "at step 0, on the teacher the runs start from"
        if steps == [0]
        else f"at step(s) {', '.join(map(str, steps))} (step 0: the teacher the runs start from; later: the teacher"
        " mode of the weights trained so far)"
    )
    lines = [
        "## What each selector keeps",
        "",
        f"Share of the CoT's step-result tokens each selector keeps (over examples, layers and heads), measured"
        f" {when};"
        " mean over the runs of each dataset that wrote `selector_keeps.json`. The last row is the share of result"
        " tokens among the CoT's tokens.",
        "",
        "| selector | " + " | ".join(f"{ds} ({d['runs']} runs)" for ds, d in by_ds.items()) + " |",
        "|---|" + "---|" * len(by_ds),
    ]
    for n in names:
        cells = [percent(d["recall"][n]) if n in d["recall"] else "--" for d in by_ds.values()]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append(
        "| result tokens in the CoT | "
        + " | ".join(percent(d["shares"].get("_cot", {}).get("result")) for d in by_ds.values())
        + " |"
    )
    return "\n".join(lines) + "\n"

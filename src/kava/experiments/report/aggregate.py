"""Aggregation over seeds: a row per (run name, dataset, eval mode) with the mean and sample std
of each evaluation metric, the accuracies by seed that the claims are tested on, and each seed's
area under its held-out accuracy curve (the secondary outcome)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .collect import method_of

EVAL_FIELDS = ("accuracy", "forward_passes", "generated_tokens", "kv_cache_bytes", "peak_kv_cache_bytes", "wall_time_s")


def curve_area(points: Sequence[tuple[int, float]]) -> float | None:
    """The area under a held-out accuracy curve by the trapezoid rule over its steps, divided by the
    steps it spans: the mean accuracy between the first evaluation and the last (None: fewer than two)."""
    if len(points) < 2:
        return None
    area = sum((s1 - s0) * (a0 + a1) / 2 for (s0, a0), (s1, a1) in zip(points, points[1:]))
    return area / (points[-1][0] - points[0][0])


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
    kv_cache_bytes, peak_kv_cache_bytes and wall_time_s; by_seed (``{seed: accuracy}``, what the
    claims are tested on); n_examples (eval examples per seed) and unfinished (seeds of this name
    and dataset without a finished state).
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
            "name": name,
            "method": method_of(name),
            "dataset": dataset,
            "train_data": first["train_data"],
            "eval_data": first["eval_data"],
            "mode": mode,
            "n": len(items),
            "seeds": sorted(i["run"]["seed"] for i in items),
        }
        for f in EVAL_FIELDS:
            row[f"{f}_mean"], row[f"{f}_std"] = mean_std([i["metrics"].get(f) for i in items])
        row["by_seed"] = {
            i["run"]["seed"]: float(i["metrics"]["accuracy"]) for i in items if i["metrics"].get("accuracy") is not None
        }
        areas = {i["run"]["seed"]: curve_area(i["run"].get("curves", {}).get(mode, [])) for i in items}
        row["area_by_seed"] = {seed: a for seed, a in areas.items() if a is not None}
        row["n_examples"] = min(int(i["metrics"].get("n", 0)) for i in items)
        row["unfinished"] = sum(
            1 for r in runs if r["name"] == name and r["dataset"] == dataset and r["state"] != "finished"
        )
        rows.append(row)
    return rows


def sem(row: dict, field_name: str = "accuracy") -> float:
    """Standard error of the mean of ``field_name`` in an aggregated row."""
    std = row.get(f"{field_name}_std") or 0.0
    return std / math.sqrt(row["n"]) if row["n"] else 0.0


def area_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` with each seed's area under its held-out accuracy curve (:func:`curve_area`) in place of
    its final accuracy, for the claims on the secondary outcome (seeds without a curve left out)."""
    out = []
    for r in rows:
        areas = r.get("area_by_seed") or {}
        mean, std = mean_std(list(areas.values()))
        out.append({**r, "by_seed": dict(areas), "n": len(areas), "accuracy_mean": mean, "accuracy_std": std})
    return [r for r in out if r["by_seed"]]

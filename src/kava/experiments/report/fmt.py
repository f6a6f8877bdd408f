"""How the report writes numbers: accuracies as percentages, p-values, mean ± std."""

from __future__ import annotations


def percent(x: float | None) -> str:
    """A fraction as a percentage with one decimal (``n/a`` for None)."""
    return "n/a" if x is None else f"{100 * x:.1f}"


def pval(p: float) -> str:
    """A p-value: three significant digits, in scientific notation under 0.001."""
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.1e}"


def acc_pm(r: dict | None) -> str:
    """An aggregated row's accuracy as ``mean ± std`` in percent (``--`` without one)."""
    return (
        "--"
        if r is None or r["accuracy_mean"] is None
        else f"{percent(r['accuracy_mean'])} ± {percent(r['accuracy_std'])}"
    )

"""The claims, as data (:data:`CLAIMS`), and their verdicts.

Each claim is tested seed by seed with the exact tests of :mod:`kava.experiments.stats`: a claim
holds only when its one-sided tests, in the direction the claim declares and Holm-adjusted within
the claim, pass at the level the report states; it does not hold when one comparison points the
other way with an adjusted two-sided p-value at or under that level; otherwise it is not
established (or not measured, where no dataset has both sides).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .. import stats
from .fmt import percent, pval

HOLDS, FAILS, NOT_ESTABLISHED, UNMEASURED = "holds", "does not hold", "not established", "not measured"


@dataclass
class ClaimNames:
    """Which run methods stand for the roles the claims name, which datasets pair up, and the
    level the claims are tested at.

    ``methods[role]`` lists method names (the first one present is used). ``nl_pairs`` is
    a list of ``(equation dataset, natural-language dataset)`` labels; left empty, every
    dataset label containing ``-nl`` is paired with the same label without it. ``alpha``: the
    one-sided level of every test; ``success_at``: the accuracy from which a seed counts as a
    success (for the success rates and Fisher's test beside the main test).
    """

    methods: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "codi": ("codi",),
            "kava": ("kava", "rkv"),
            "right_crop": ("right_crop",),
            "mean_pool": ("mean_pool",),
            "shuffled": ("shuffled",),
            "slot_mean": ("slot_mean",),
            "counterfactual": ("counterfactual",),
        }
    )
    nl_pairs: list[tuple[str, str]] = field(default_factory=list)
    mode: str = "student"
    alpha: float = 0.05
    success_at: float = 0.9
    power: float = 0.8
    claims: tuple[str, ...] = ()
    """The claims tested (``("1", "4", "5")``: those a pre-registration names); empty: all five."""


@dataclass
class Verdict:
    """One claim tested against the runs: ``holds`` (its one-sided test passes in the declared
    direction), ``does not hold`` (a two-sided test finds the opposite direction), ``not
    established`` or ``not measured``."""

    claim: str
    statement: str
    status: str
    details: list[str] = field(default_factory=list)
    p_value: float | None = None
    """The claim's p-value: the largest of its comparisons' Holm-adjusted one-sided p-values (a
    claim made of several comparisons holds only when every one passes after the adjustment)."""
    alpha: float = 0.05
    seeds_needed: int | None = None
    """Where not established: the seeds per arm its weakest comparison would need at ``alpha / m``
    (None: the observed difference points the other way, or it holds)."""
    unmeasured: list[str] = field(default_factory=list)
    """Comparisons the claim is made of that no dataset measured: while any is missing the claim
    cannot hold, whatever the measured ones say."""
    p_values: list[dict] = field(default_factory=list)
    """Per comparison: ``comparison`` (a label), ``p`` (raw, one-sided as claimed), ``p_holm``
    (Holm-adjusted within the claim), ``p_two_sided`` and ``p_two_sided_holm``, ``mean_diff``."""

    def text(self) -> str:
        head = f"({self.claim}) {self.statement}: **{self.status}**"
        if self.p_value is not None:
            holm = f", Holm-adjusted over {len(self.p_values)} comparisons" if len(self.p_values) > 1 else ""
            head += f" (p = {pval(self.p_value)}{holm}, alpha = {self.alpha:g} one-sided)"
        if self.status == NOT_ESTABLISHED and self.unmeasured:
            head += f"; not measured: {', '.join(self.unmeasured)}, so the claim cannot hold"
        if self.status == NOT_ESTABLISHED and self.seeds_needed:
            head += f"; about {self.seeds_needed} seeds per arm would be needed at the observed effect and spread"
        elif self.status == NOT_ESTABLISHED and not self.unmeasured:
            head += "; the observed difference is not in the claimed direction"
        return "\n".join([head, *(f"  - {d}" for d in self.details)])


def _cell(row: dict) -> str:
    return f"{row['name']} {percent(row['accuracy_mean'])} ± {percent(row['accuracy_std'])} (n={row['n']})"


class RoleTable:
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


@dataclass
class _Test:
    """One comparison behind a claim: its line of text, its outcome and a short label."""

    detail: str
    comparison: stats.Comparison
    label: str = ""


def successes(row: dict, at: float) -> tuple[int, int]:
    vals = list(row["by_seed"].values())
    return sum(v >= at for v in vals), len(vals)


def _describe(c: stats.Comparison, names: ClaimNames) -> str:
    """A comparison behind a claim: its one-sided p-value in the claim's direction; where the
    difference points the other way, its two-sided p-value. Whether it passes is the verdict's
    to say, after the Holm adjustment over the claim's comparisons."""
    if c.paired:
        ci = f" (95% bootstrap CI {100 * c.diff_ci[0]:+.1f} to {100 * c.diff_ci[1]:+.1f})" if c.diff_ci else ""
        text = (
            f"paired by seed (n={len(c.seeds)}): mean difference {100 * c.mean_diff:+.1f}{ci}; {c.test}"
            f" p = {pval(c.p)} one-sided as claimed, sign test p = {pval(c.sign_p)}"
        )
    else:
        text = (
            f"unpaired, fewer than 2 common seeds ({c.n_a} vs {c.n_b}): difference of means"
            f" {100 * c.mean_diff:+.1f}; {c.test} p = {pval(c.p)} one-sided as claimed"
        )
    if c.mean_diff < 0:
        return text + f"; against the claim, two-sided p = {pval(c.p_two_sided)}"
    return text


def _beats(table: RoleTable, winner: str, loser: str) -> list[_Test]:
    """For every dataset with both roles, the one-sided test that ``winner`` is more accurate."""
    out = []
    for ds in table.datasets:
        a, b = table.get(winner, ds), table.get(loser, ds)
        if a is None or b is None:
            continue
        c = stats.compare(a["by_seed"], b["by_seed"])
        ka, na = successes(a, table.names.success_at)
        kb, nb = successes(b, table.names.success_at)
        fisher = stats.fisher_greater(ka, na, kb, nb)
        out.append(
            _Test(
                f"{ds}: {_cell(a)} vs {_cell(b)}: {_describe(c, table.names)}; successes"
                f" (>= {percent(table.names.success_at)}%) {ka}/{na} vs {kb}/{nb}, Fisher p = {pval(fisher)}",
                c,
                f"{ds}: {a['name']} > {b['name']}",
            )
        )
    return out


def _verdict(claim: str, statement: str, tests: list[_Test], missing: str, names: ClaimNames) -> Verdict:
    """The claim's comparisons are one family: their p-values are Holm-adjusted within the claim.
    ``holds`` when every comparison's adjusted one-sided p-value, in the claim's direction, is at or
    under ``alpha``; ``does not hold`` when one points the other way with an adjusted two-sided
    p-value at or under ``alpha`` (a one-sided test in the direction observed is never a passed
    test); else ``not established`` with the seeds the weakest comparison would need at
    ``alpha / m`` (``m`` comparisons)."""
    if not tests:
        return Verdict(claim, statement, UNMEASURED, [missing], alpha=names.alpha)
    m = len(tests)
    adjusted = stats.holm([t.comparison.p for t in tests])
    adjusted_two = stats.holm([t.comparison.p_two_sided for t in tests])
    details, table = [], []
    for t, a, a2 in zip(tests, adjusted, adjusted_two):
        text = t.detail + (f"; Holm-adjusted over the claim's {m} comparisons p = {pval(a)}" if m > 1 else "")
        details.append(text + (" (passes)" if a <= names.alpha else ""))
        table.append(
            {
                "comparison": t.label,
                "p": t.comparison.p,
                "p_holm": a,
                "p_two_sided": t.comparison.p_two_sided,
                "p_two_sided_holm": a2,
                "mean_diff": t.comparison.mean_diff,
            }
        )
    p = max(adjusted)
    if p <= names.alpha:
        return Verdict(claim, statement, HOLDS, details, p, names.alpha, p_values=table)
    if any(t.comparison.mean_diff < 0 and a2 <= names.alpha for t, a2 in zip(tests, adjusted_two)):
        return Verdict(claim, statement, FAILS, details, p, names.alpha, p_values=table)
    # Every comparison at alpha / m passes Holm's adjustment whatever the others' p-values.
    needs = [t.comparison.needed(names.alpha / m, names.power) for t, a in zip(tests, adjusted) if a > names.alpha]
    return Verdict(
        claim,
        statement,
        NOT_ESTABLISHED,
        details,
        p,
        names.alpha,
        None if None in needs else max(needs),
        p_values=table,
    )


def _nl_pairs(table: RoleTable) -> list[tuple[str, str]]:
    if table.names.nl_pairs:
        return [tuple(p) for p in table.names.nl_pairs]  # type: ignore[misc]
    present = set(table.datasets)
    return [
        (ds.replace("-nl", "", 1), ds) for ds in table.datasets if "-nl" in ds and ds.replace("-nl", "", 1) in present
    ]


def _beats_all(table: RoleTable, against: Sequence[str]) -> list[_Test]:
    """For every role in ``against`` and every dataset with it and ``kava``, the one-sided test that
    ``kava`` is more accurate."""
    return [t for loser in against for t in _beats(table, "kava", loser)]


def _smaller_drop(table: RoleTable, against: Sequence[str]) -> list[_Test]:
    """For every equation dataset and its natural-language counterpart with ``kava`` and the
    reference (the one role in ``against``) on both, the one-sided test that the reference's drop in
    accuracy exceeds ``kava``'s."""
    (ref,) = against
    tests = []
    for eq, nl in _nl_pairs(table):
        cells = [table.get(role, ds) for role in ("kava", ref) for ds in (eq, nl)]
        if any(c is None for c in cells):
            continue
        k_eq, k_nl, c_eq, c_nl = cells
        drop_k = {s: k_eq["by_seed"][s] - k_nl["by_seed"][s] for s in set(k_eq["by_seed"]) & set(k_nl["by_seed"])}
        drop_c = {s: c_eq["by_seed"][s] - c_nl["by_seed"][s] for s in set(c_eq["by_seed"]) & set(c_nl["by_seed"])}
        if not drop_k or not drop_c:
            continue
        # The claim: CODI's drop exceeds KaVa's (paired by seed where all four cells share seeds).
        c = stats.compare(drop_c, drop_k)
        tests.append(
            _Test(
                f"{eq} → {nl}: drop with {k_eq['name']} {100 * statistics.fmean(drop_k.values()):+.1f}"
                f" ({percent(k_eq['accuracy_mean'])} → {percent(k_nl['accuracy_mean'])}),"
                f" with {c_eq['name']} {100 * statistics.fmean(drop_c.values()):+.1f}"
                f" ({percent(c_eq['accuracy_mean'])} → {percent(c_nl['accuracy_mean'])}); CODI's drop minus KaVa's:"
                f" {_describe(c, table.names)}",
                c,
                f"{eq} → {nl}: CODI's drop > KaVa's",
            )
        )
    return tests


@dataclass(frozen=True)
class Claim:
    """A claim as data: R-KV (the ``kava`` role) against each role in ``against``. ``tests`` builds
    the claim's comparisons (one family: Holm-adjusted together); ``needs`` ends the line of a claim
    that nothing measured, after the roles it needs."""

    number: str
    statement: str
    against: tuple[str, ...]
    tests: Callable[[RoleTable, Sequence[str]], list[_Test]] = _beats_all
    needs: str = "on one dataset"


CLAIMS = (
    Claim("1", "KV distillation beats CODI-only", ("codi",)),
    Claim("2", "R-KV selection beats right-crop and mean-pool", ("right_crop", "mean_pool")),
    Claim("3", "shuffled teacher KV does worse than R-KV", ("shuffled",)),
    Claim(
        "4",
        "the drop from equation to natural-language traces is smaller with KaVa than with CODI",
        ("codi",),
        tests=_smaller_drop,
        needs="on an equation dataset and its -nl counterpart",
    ),
    Claim(
        "5",
        "the KV loss carries example-specific content: R-KV beats slot-mean and counterfactual CoT",
        ("slot_mean", "counterfactual"),
    ),
)
"""The paper's four claims and this project's fifth, in the order the report gives them."""


def _check(claim: Claim, table: RoleTable) -> Verdict:
    """``claim`` tested on ``table``. Every comparison a claim is made of must pass, so a claim with a
    role that no dataset measured is at best not established."""
    names = table.names

    def who(role: str) -> str:
        return "/".join(names.methods.get(role, (role,)))

    missing = f"needs {who('kava')} and " + " or ".join(who(x) for x in claim.against) + f" {claim.needs}"
    v = _verdict(claim.number, claim.statement, claim.tests(table, claim.against), missing, names)
    if v.status == UNMEASURED:
        return v
    for loser in claim.against:
        if not any(table.get(loser, ds) for ds in table.datasets):
            v.details.append(f"{who(loser)} not measured: only the other control was compared")
            v.unmeasured.append(f"{who('kava')} against {who(loser)}")
    if v.unmeasured and v.status == HOLDS:  # every comparison must pass, so a missing one cannot
        v.status = NOT_ESTABLISHED
    return v


def check_claims(rows: Sequence[dict], names: ClaimNames | None = None) -> list[Verdict]:
    """The claims of :data:`CLAIMS` (those ``names.claims`` lists, where it lists any), each tested on
    every dataset where both sides were measured (see :func:`kava.experiments.stats.compare`: paired
    by seed where the arms share seeds). A claim holds only when every comparison behind it passes
    its one-sided test at ``names.alpha``."""
    names = names or ClaimNames()
    table = RoleTable(rows, names)
    return [_check(c, table) for c in CLAIMS if not names.claims or c.number in names.claims]

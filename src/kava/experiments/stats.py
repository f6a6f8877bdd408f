"""The statistics behind `kava report`'s verdicts.

Seeds are the unit: one accuracy per seed and arm. Arms that share a seed share the data order
(and, in a sweep, the initial weights), so two arms are compared *paired by seed* wherever they
have seeds in common: a sign-flip permutation test of the per-seed differences. Arms with no
common seeds fall back on a two-sample permutation test. Beside them: the sign test, exact
(Clopper-Pearson) intervals on success rates and Fisher's exact test between them, seeded
percentile-bootstrap intervals on mean accuracies, and Holm's step-down adjustment for a family
of tests.

**Ties are counted exactly.** Accuracies are counts over a fixed set of questions (``k / n``), so
the permutation tests first put the values on the finest integer grid they lie on
(:func:`integer_grid`: ``0.765`` and ``0.9`` are 153/200 and 180/200) and compute the exact null
distribution of the integer statistic by dynamic programming over its possible sums, for any
number of seeds. Only values on no such grid fall back on enumerating every pattern (small
samples) or a seeded Monte-Carlo draw, with an absolute tolerance for ties.

Each test gives the one-sided p-value of either direction and the two-sided one;
:func:`seeds_needed` says how many seeds an observed effect would need to reach the level with
the usual power.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from scipy import stats

GRID_MAX = 100_000
"""The largest denominator :func:`integer_grid` looks for (an evaluation set of up to 100,000 questions)."""
DP_MAX = 20_000_000
"""The most cells the exact null distribution may take (sums x subset sizes); beyond it, the fallbacks."""
EXACT_MAX = 16
"""Values on no integer grid: up to this many pairs the sign-flip test enumerates every sign pattern (65,536)."""
MONTE_CARLO = 100_000
"""Resamples of a permutation test that is neither on a grid nor small enough to enumerate."""
ALTERNATIVES = ("greater", "less", "two-sided")


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided ``level`` interval of a success rate ``k / n``."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def bootstrap_mean(
    values: Sequence[float], level: float = 0.95, seed: int = 0, n_resamples: int = 9999
) -> tuple[float, float] | None:
    """A seeded percentile-bootstrap ``level`` interval of the mean of ``values`` (None for fewer
    than 2 values; a single point when they are all equal)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap(
        (x,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def integer_grid(values: Sequence[float]) -> int | None:
    """The smallest ``g <= GRID_MAX`` such that every ``value * g`` is an integer (to 1e-12
    relative), or None. Accuracies on ``n`` questions lie on ``g = n`` or a divisor of it."""
    g = 1
    for x in values:
        x = float(x)
        if not math.isfinite(x):
            return None
        f = Fraction(x).limit_denominator(GRID_MAX)
        if abs(float(f) - x) > 1e-12 * max(1.0, abs(x)):
            return None
        g = math.lcm(g, f.denominator)
        if g > GRID_MAX:
            return None
    return g


def _on_grid(values: Sequence[float], g: int) -> list[int]:
    return [round(float(x) * g) for x in values]


@dataclass(frozen=True)
class PValues:
    """A permutation test's p-values: ``greater`` (the statistic is larger than chance), ``less``
    and ``two_sided`` (its absolute value is), and whether they are exact."""

    greater: float
    less: float
    two_sided: float
    exact: bool

    def get(self, alternative: str) -> float:
        if alternative not in ALTERNATIVES:
            raise ValueError(f"alternative={alternative!r}: choose from {', '.join(ALTERNATIVES)}")
        return {"greater": self.greater, "less": self.less, "two-sided": self.two_sided}[alternative]


def _tail_sums(counts: np.ndarray, obs: int, total) -> tuple[float, float]:
    """P(X >= obs), P(X <= obs) for X with ``counts`` over 0..len-1 (``total`` patterns)."""
    upper, lower = counts[obs:].sum(), counts[: obs + 1].sum()
    return float(upper / total), float(lower / total)


def _counts_dtype(n_patterns: int):
    return np.int64 if n_patterns < 2**62 else np.float64  # float64 beyond: still exact supports, 1e-16 rounding


def sign_flip_exact(k: Sequence[int]) -> PValues:
    """The exact sign-flip test of integer paired differences ``k``: over all ``2^n`` sign
    patterns, the distribution of ``sum(s_i * k_i)``, by dynamic programming over subset sums of
    ``|k_i|`` (``sum = 2 * T - sum|k|`` with ``T`` the sum of the ``|k_i|`` taken with a plus sign)."""
    k = [int(x) for x in k]
    if not k:
        raise ValueError("no paired differences")
    a = [abs(x) for x in k]
    total_abs = sum(a)
    counts = np.zeros(total_abs + 1, dtype=_counts_dtype(2 ** len(k)))
    counts[0] = 1
    for x in a:
        if x:
            counts[x:] = counts[x:] + counts[:-x].copy()
        else:
            counts = counts * 2
    n_patterns = counts.sum()
    t_obs = sum(x for x in k if x > 0)
    greater, less = _tail_sums(counts, t_obs, n_patterns)
    stat = 2 * np.arange(total_abs + 1) - total_abs
    two = float(counts[np.abs(stat) >= abs(2 * t_obs - total_abs)].sum() / n_patterns)
    return PValues(greater, less, two, True)


def two_sample_exact(a: Sequence[int], b: Sequence[int]) -> PValues:
    """The exact two-sample permutation test of integer values: over all ``C(n_a + n_b, n_a)``
    relabellings, the distribution of ``sum(a)`` (the difference of means rises with it), by
    dynamic programming over subset sizes and sums."""
    a, b = [int(x) for x in a], [int(x) for x in b]
    if not a or not b:
        raise ValueError("both arms need at least one value")
    pooled = a + b
    lo = min(pooled)
    v = [x - lo for x in pooled]  # shifted to >= 0: sum(subset) shifts by n_a * lo, order kept
    na, n = len(a), len(pooled)
    top = sum(sorted(v)[-na:])
    counts = np.zeros((na + 1, top + 1), dtype=_counts_dtype(math.comb(n, na)))
    counts[0, 0] = 1
    for x in v:
        for c in range(na, 0, -1):
            if x:
                counts[c, x:] += counts[c - 1, :-x]
            else:
                counts[c] += counts[c - 1]
    dist = counts[na]
    n_patterns = dist.sum()
    s_obs = sum(a) - na * lo
    greater, less = _tail_sums(dist, s_obs, n_patterns)
    # mean(a) - mean(b) is proportional to s * n - total * n_a (in shifted units): compare integers.
    total = sum(v)
    stat = np.arange(top + 1) * n - total * na
    two = float(dist[np.abs(stat) >= abs(s_obs * n - total * na)].sum() / n_patterns)
    return PValues(greater, less, two, True)


def _from_draws(draws: np.ndarray, obs: float, tol: float, exact: bool) -> PValues:
    """P-values of ``obs`` against statistics ``draws`` (every pattern when ``exact``, else a
    Monte-Carlo sample with the observed pattern counted once more), ties within ``tol``."""
    add = 0 if exact else 1
    m = draws.size + add
    greater = (int(np.sum(draws >= obs - tol)) + add) / m
    less = (int(np.sum(draws <= obs + tol)) + add) / m
    two = (int(np.sum(np.abs(draws) >= abs(obs) - tol)) + add) / m
    return PValues(float(greater), float(less), float(min(1.0, two)), exact)


def sign_flip(diffs: Sequence[float], seed: int = 0) -> PValues:
    """The sign-flip test of the sum (equivalently the mean) of paired differences: exact on an
    integer grid (:func:`sign_flip_exact`), else every pattern up to ``EXACT_MAX`` pairs, else a
    seeded Monte-Carlo draw; ties within an absolute tolerance of 1e-9 of ``sum|d|``."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 1:
        raise ValueError("no paired differences")
    g = integer_grid(d.tolist())
    if g is not None:
        k = _on_grid(d.tolist(), g)
        if sum(abs(x) for x in k) * 1 <= DP_MAX:
            return sign_flip_exact(k)
    tol = 1e-9 * float(np.abs(d).sum())
    if d.size <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        return _from_draws(signs @ d, float(d.sum()), tol, True)
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([1.0, -1.0]), size=(MONTE_CARLO, d.size))
    return _from_draws(signs @ d, float(d.sum()), tol, False)


def two_sample(a: Sequence[float], b: Sequence[float], seed: int = 0) -> PValues:
    """The two-sample permutation test of ``mean(a) - mean(b)`` over relabellings of the pooled
    values: exact on an integer grid (:func:`two_sample_exact`), else every relabelling while there
    are at most ``MONTE_CARLO``, else a seeded Monte-Carlo draw; ties within an absolute tolerance."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 1 or b.size < 1:
        raise ValueError("both arms need at least one value")
    pooled = np.concatenate([a, b])
    g = integer_grid(pooled.tolist())
    if g is not None:
        k = _on_grid(pooled.tolist(), g)
        span = max(k) - min(k)
        if (a.size + 1) * (a.size * span + 1) <= DP_MAX:
            return two_sample_exact(k[: a.size], k[a.size :])
    tol = 1e-9 * float(np.abs(pooled).sum() + 1e-300)

    def stat(sums):
        return sums / a.size - (pooled.sum() - sums) / b.size

    if math.comb(pooled.size, a.size) <= MONTE_CARLO:
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(pooled.size), a.size)])
        return _from_draws(stat(sums), float(a.mean() - b.mean()), tol, True)
    rng = np.random.default_rng(seed)
    sums = np.array([rng.permutation(pooled)[: a.size].sum() for _ in range(MONTE_CARLO)])
    return _from_draws(stat(sums), float(a.mean() - b.mean()), tol, False)


def paired_permutation(diffs: Sequence[float], alternative: str = "greater", seed: int = 0) -> tuple[float, bool]:
    """The sign-flip p-value of paired differences (:func:`sign_flip`) and whether it is exact.

    ``alternative="greater"``: the differences are positive (the first arm is better);
    ``"less"``; ``"two-sided"``."""
    if np.all(np.asarray(diffs, dtype=float) == 0) and len(diffs):
        return 1.0, True
    res = sign_flip(diffs, seed)
    return res.get(alternative), res.exact


def two_sample_permutation(
    a: Sequence[float], b: Sequence[float], alternative: str = "greater", seed: int = 0
) -> tuple[float, bool]:
    """The two-sample permutation p-value of ``mean(a) - mean(b)`` (:func:`two_sample`) and whether it is exact."""
    res = two_sample(a, b, seed)
    return res.get(alternative), res.exact


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the ``i``-th smallest of ``m``
    p-values is multiplied by ``m - i + 1`` (``i`` from 1), capped at 1, and made non-decreasing
    in that order. Rejecting every adjusted p-value at or under ``alpha`` controls the family-wise
    error rate at ``alpha``."""
    p = [float(x) for x in pvalues]
    if any(not 0 <= x <= 1 for x in p):
        raise ValueError(f"p-values must lie in [0, 1], got {p}")
    order = sorted(range(len(p)), key=lambda i: p[i])
    out = [0.0] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        out[i] = running
    return out


def sign_test(diffs: Sequence[float], alternative: str = "greater") -> float:
    """One-sided exact sign test of paired differences (zeros dropped; 1.0 when all are zero)."""
    d = [x for x in diffs if x != 0]
    if not d:
        return 1.0
    return float(stats.binomtest(sum(x > 0 for x in d), len(d), 0.5, alternative=alternative).pvalue)


def fisher_greater(k1: int, n1: int, k2: int, n2: int) -> float:
    """One-sided Fisher exact p-value that arm 1's success rate ``k1/n1`` exceeds arm 2's."""
    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]], alternative="greater").pvalue)


def min_exact_seeds(alpha: float) -> int:
    """The fewest pairs with which an exact sign-flip test can reach ``alpha`` at all
    (its smallest p-value is ``2^-n``)."""
    return max(1, math.ceil(math.log2(1 / alpha)))


def seeds_needed(effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, paired: bool = True) -> int | None:
    """Seeds (per arm) for a one-sided level-``alpha`` test to detect ``effect`` with ``power``,
    from the normal approximation ``n = ((z_{1-alpha} + z_power) * sd / effect)^2`` (``sd``: of the
    paired differences; unpaired, ``sd^2`` is the sum of the two arms' variances), and never
    fewer than :func:`min_exact_seeds`. None when the effect is not positive."""
    if not effect > 0:
        return None
    z = stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)
    n = math.ceil((z * sd / effect) ** 2) if sd > 0 else 1
    return max(n, min_exact_seeds(alpha), 2)


@dataclass
class Comparison:
    """Arm ``a`` against arm ``b`` (the claim: ``a`` is better), seed by seed where they pair up."""

    paired: bool
    n_a: int
    n_b: int
    seeds: list[int]  # the common seeds (paired), else empty
    mean_diff: float
    diff_ci: tuple[float, float] | None  # bootstrap interval of the mean paired difference
    p: float  # one-sided, a > b (the direction a claim declares)
    p_reverse: float  # one-sided, a < b
    exact: bool
    sign_p: float | None  # paired only
    sd: float  # of the paired differences, or sqrt(var_a + var_b)
    test: str
    p_two_sided: float = 1.0  # |a - b| larger than chance: what a description of the data gives

    def needed(self, alpha: float, power: float = 0.8) -> int | None:
        return seeds_needed(self.mean_diff, self.sd, alpha, power, self.paired)


def _test_name(paired: bool, exact: bool) -> str:
    kind = "paired sign-flip permutation test" if paired else "two-sample permutation test"
    return f"exact {kind}" if exact else f"{kind} (Monte Carlo)"


def compare(a: dict[int, float], b: dict[int, float], seed: int = 0) -> Comparison | None:
    """Compare two arms given as ``{seed: value}``: paired on their common seeds when there are at
    least two, else as two samples (None when an arm has no value)."""
    if not a or not b:
        return None
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        g = integer_grid([a[s] for s in common] + [b[s] for s in common])
        if g is not None:  # differences of the counts themselves, free of float error
            d_int = [round(a[s] * g) - round(b[s] * g) for s in common]
            d = [x / g for x in d_int]
        else:
            d = [a[s] - b[s] for s in common]
        res = PValues(1.0, 1.0, 1.0, True) if all(x == 0 for x in d) else sign_flip(d, seed)
        sd = float(np.std(d, ddof=1))
        return Comparison(
            True,
            len(a),
            len(b),
            common,
            float(np.mean(d)),
            bootstrap_mean(d, seed=seed),
            res.greater,
            res.less,
            res.exact,
            sign_test(d),
            sd,
            _test_name(True, res.exact),
            res.two_sided,
        )
    va, vb = list(a.values()), list(b.values())
    res = two_sample(va, vb, seed)
    var = (np.var(va, ddof=1) if len(va) > 1 else 0.0) + (np.var(vb, ddof=1) if len(vb) > 1 else 0.0)
    return Comparison(
        False,
        len(a),
        len(b),
        [],
        float(np.mean(va) - np.mean(vb)),
        None,
        res.greater,
        res.less,
        res.exact,
        None,
        float(math.sqrt(var)),
        _test_name(False, res.exact),
        res.two_sided,
    )


__all__ = [
    "ALTERNATIVES",
    "Comparison",
    "EXACT_MAX",
    "PValues",
    "bootstrap_mean",
    "clopper_pearson",
    "compare",
    "fisher_greater",
    "holm",
    "integer_grid",
    "min_exact_seeds",
    "paired_permutation",
    "seeds_needed",
    "sign_flip",
    "sign_flip_exact",
    "sign_test",
    "two_sample",
    "two_sample_exact",
    "two_sample_permutation",
]

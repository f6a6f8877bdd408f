"""The statistics behind `kava report`'s verdicts, on scipy's distributions.

Seeds are the unit: one accuracy per seed and arm. Arms that share a seed share the data order
(and, in a sweep, the initial weights), so two arms are compared *paired by seed* wherever they
have seeds in common: an exact sign-flip permutation test of the mean per-seed difference (all
``2^n`` sign patterns while ``n <= EXACT_MAX``, else a seeded Monte-Carlo draw). Arms with no
common seeds fall back on an exact two-sample permutation test. Beside them: the sign test,
exact (Clopper-Pearson) intervals on success rates and Fisher's exact test between them, and
seeded percentile-bootstrap intervals on mean accuracies.

Every test here is one-sided in the direction a claim states; :func:`seeds_needed` says how many
seeds an observed effect would need to reach the level with the usual power.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

EXACT_MAX = 16
"""Up to this many pairs the sign-flip test enumerates every sign pattern (65,536)."""
MONTE_CARLO = 100_000
"""Resamples of a permutation test too large to enumerate."""


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided ``level`` interval of a success rate ``k / n``."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return float(ci.low), float(ci.high)


def bootstrap_mean(values: Sequence[float], level: float = 0.95, seed: int = 0, n_resamples: int = 9999) -> tuple[float, float] | None:
    """A seeded percentile-bootstrap ``level`` interval of the mean of ``values`` (None for fewer
    than 2 values; a single point when they are all equal)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.mean, confidence_level=level, n_resamples=n_resamples, method="percentile",
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_stat(x, axis=-1):
    return np.mean(x, axis=axis)


def _mean_diff(a, b, axis=-1):
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def paired_permutation(diffs: Sequence[float], alternative: str = "greater", seed: int = 0) -> tuple[float, bool]:
    """One-sided p-value of the mean of paired differences (sign flips), and whether it is exact.

    ``alternative="greater"``: the differences are positive (the first arm is better)."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 1:
        raise ValueError("no paired differences")
    if np.all(d == 0):
        return 1.0, True
    exact = d.size <= EXACT_MAX
    res = stats.permutation_test((d,), _mean_stat, permutation_type="samples", alternative=alternative,
                                 n_resamples=np.inf if exact else MONTE_CARLO, rng=np.random.default_rng(seed), vectorized=True)
    return float(res.pvalue), exact


def two_sample_permutation(a: Sequence[float], b: Sequence[float], alternative: str = "greater", seed: int = 0) -> tuple[float, bool]:
    """One-sided p-value of ``mean(a) - mean(b)`` over relabellings of the pooled values, and
    whether it is exact (every relabelling, while there are at most 100,000)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 1 or b.size < 1:
        raise ValueError("both arms need at least one value")
    if math.comb(a.size + b.size, a.size) <= MONTE_CARLO:
        # Every relabelling (scipy's version needs two values per arm; a single seed is common here).
        pooled = np.concatenate([a, b])
        observed = a.mean() - b.mean()
        total = pooled.sum()
        sums = np.array([pooled[list(idx)].sum() for idx in itertools.combinations(range(pooled.size), a.size)])
        diffs = sums / a.size - (total - sums) / b.size
        tol = 1e-12 * max(1.0, abs(observed))
        hits = diffs >= observed - tol if alternative == "greater" else diffs <= observed + tol
        return float(hits.mean()), True
    res = stats.permutation_test((a, b), _mean_diff, permutation_type="independent", alternative=alternative,
                                 n_resamples=MONTE_CARLO, rng=np.random.default_rng(seed), vectorized=True)
    return float(res.pvalue), False


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
    p: float  # one-sided, a > b
    p_reverse: float  # one-sided, a < b
    exact: bool
    sign_p: float | None  # paired only
    sd: float  # of the paired differences, or sqrt(var_a + var_b)
    test: str

    def needed(self, alpha: float, power: float = 0.8) -> int | None:
        return seeds_needed(self.mean_diff, self.sd, alpha, power, self.paired)


def compare(a: dict[int, float], b: dict[int, float], seed: int = 0) -> Comparison | None:
    """Compare two arms given as ``{seed: value}``: paired on their common seeds when there are at
    least two, else as two samples (None when an arm has no value)."""
    if not a or not b:
        return None
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        d = [a[s] - b[s] for s in common]
        p, exact = paired_permutation(d, "greater", seed)
        p_rev, _ = paired_permutation(d, "less", seed)
        sd = float(np.std(d, ddof=1))
        return Comparison(True, len(a), len(b), common, float(np.mean(d)), bootstrap_mean(d, seed=seed), p, p_rev, exact,
                          sign_test(d), sd, "exact paired sign-flip permutation test" if exact else "paired sign-flip permutation test (Monte Carlo)")
    va, vb = list(a.values()), list(b.values())
    p, exact = two_sample_permutation(va, vb, "greater", seed)
    p_rev, _ = two_sample_permutation(va, vb, "less", seed)
    var = (np.var(va, ddof=1) if len(va) > 1 else 0.0) + (np.var(vb, ddof=1) if len(vb) > 1 else 0.0)
    return Comparison(False, len(a), len(b), [], float(np.mean(va) - np.mean(vb)), None, p, p_rev, exact, None, float(math.sqrt(var)),
                      "exact two-sample permutation test" if exact else "two-sample permutation test (Monte Carlo)")


__all__ = [
    "Comparison", "EXACT_MAX", "bootstrap_mean", "clopper_pearson", "compare", "fisher_greater", "min_exact_seeds",
    "paired_permutation", "seeds_needed", "sign_test", "two_sample_permutation",
]

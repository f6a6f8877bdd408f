"""The report's statistics against textbook values and brute-force enumeration."""

import itertools
import math
from fractions import Fraction

import pytest
from scipy import stats as sp_stats

from kava.experiments import stats


def test_clopper_pearson_textbook_values():
    lo, hi = stats.clopper_pearson(3, 10)
    assert lo == pytest.approx(0.0667, abs=1e-4) and hi == pytest.approx(0.6525, abs=1e-4)
    assert stats.clopper_pearson(0, 3) == pytest.approx((0.0, 1 - 0.025 ** (1 / 3)))  # closed form at k = 0
    assert stats.clopper_pearson(10, 10)[1] == 1.0 and stats.clopper_pearson(10, 10)[0] == pytest.approx(0.025**0.1)
    with pytest.raises(ValueError, match="k <= n"):
        stats.clopper_pearson(4, 3)


def _brute_sign_flip(k):
    """Every sign pattern of integer differences ``k``: P(sum >= obs), P(sum <= obs), P(|sum| >= |obs|)."""
    obs = sum(k)
    sums = [sum(s * x for s, x in zip(signs, k)) for signs in itertools.product((1, -1), repeat=len(k))]
    m = len(sums)
    return sum(x >= obs for x in sums) / m, sum(x <= obs for x in sums) / m, sum(abs(x) >= abs(obs) for x in sums) / m


def _brute_two_sample(a, b):
    """Every relabelling of integer values: the same three p-values of mean(a) - mean(b), in exact fractions."""
    pooled, na = a + b, len(a)
    obs = Fraction(sum(a), na) - Fraction(sum(b), len(b))
    stats_ = []
    for idx in itertools.combinations(range(len(pooled)), na):
        sa = sum(pooled[i] for i in idx)
        stats_.append(Fraction(sa, na) - Fraction(sum(pooled) - sa, len(b)))
    m = len(stats_)
    return (
        sum(x >= obs for x in stats_) / m,
        sum(x <= obs for x in stats_) / m,
        sum(abs(x) >= abs(obs) for x in stats_) / m,
    )


def test_ties_around_a_zero_statistic_are_counted():
    # 0.1 + 0.2 - 0.3 is 5.6e-17 in floats; of the 8 sign patterns 5 reach a sum >= 0 (two of them exactly 0).
    assert stats.paired_permutation([0.1, 0.2, -0.3]) == (0.625, True)
    assert stats.paired_permutation([0.1, 0.2, -0.3], "less") == (0.625, True)


@pytest.mark.parametrize(
    "k",
    [
        [1, 1, 1, 1, 1],
        [2, 1, -1, 3, -2, 1],
        [5, -5, 5, -5],
        [3, 0, -3, 0, 6],
        [7, -2, -5, 2, 0, 1, 1],
        [30, -12, 45, 0, -30, 12, 3, -3],
        [1],
    ],
)
def test_paired_permutation_is_the_exact_sign_flip_test_with_ties(k):
    # As accuracies on 600 questions, the differences carry float error; the test must see the counts.
    d = [(x + 300) / 600 - 300 / 600 for x in k]
    want = _brute_sign_flip(k)
    got = stats.sign_flip(d)
    assert got.exact and (got.greater, got.less, got.two_sided) == pytest.approx(want, abs=1e-15)
    assert stats.paired_permutation(d, "two-sided")[0] == pytest.approx(want[2], abs=1e-15)
    assert stats.paired_permutation([0.0, 0.0]) == (1.0, True)


def test_many_seeds_are_exact_too():
    # 40 pairs, every difference one question: the sum is (#plus - #minus), so the test is a binomial tail.
    d = [1 / 600] * 25 + [-1 / 600] * 15
    res = stats.sign_flip(d)
    assert res.exact and res.greater == pytest.approx(float(sp_stats.binom.sf(24, 40, 0.5)), rel=1e-12)
    assert res.less == pytest.approx(float(sp_stats.binom.cdf(25, 40, 0.5)), rel=1e-12)
    assert res.two_sided == pytest.approx(2 * res.greater, rel=1e-12)
    assert stats.sign_flip([1 / 600] * 60).greater == 2.0**-60  # the one all-plus pattern, at 60 seeds


def test_values_on_no_grid_use_enumeration_or_a_seeded_monte_carlo_draw():
    small = [math.sqrt(2), -math.sqrt(3), math.pi]
    assert stats.integer_grid(small) is None
    res = stats.sign_flip(small)
    # Sums >= obs (sqrt2 - sqrt3 + pi = 2.82): itself, sqrt2 + sqrt3 + pi and -sqrt2 + sqrt3 + pi.
    assert res.exact and res.greater == pytest.approx(3 / 8)
    d = [math.sqrt(i + 2) * (1 if i % 4 else -1) for i in range(20)]
    p, exact = stats.paired_permutation(d)
    assert not exact and 0 < p < 1 and stats.paired_permutation(d) == (p, exact)


def test_integer_grid_finds_the_counts():
    assert stats.integer_grid([459 / 600, 580 / 600, 0.0, 1.0]) == 600  # 153/200 and 29/30
    assert stats.integer_grid([0.1, 0.25]) == 20 and stats.integer_grid([3, 4]) == 1
    assert stats.integer_grid([math.e]) is None and stats.integer_grid([float("nan")]) is None


@pytest.mark.parametrize(
    "a,b",
    [
        ([3, 4, 5], [0, 1, 2]),
        ([5, 5, 3], [5, 3, 3, 1]),
        ([2], [2, 2, 4]),
        ([0, 6, 6], [6, 0]),
        ([1, 1, 2, 2, 3], [1, 2, 2, 3, 3, 3]),
    ],
)
def test_two_sample_permutation_is_exact_with_ties(a, b):
    want = _brute_two_sample(a, b)
    res = stats.two_sample([x / 600 for x in a], [x / 600 for x in b])
    assert res.exact and (res.greater, res.less, res.two_sided) == pytest.approx([float(w) for w in want], abs=1e-15)
    assert stats.two_sample_permutation([3, 4, 5], [0, 1, 2]) == (pytest.approx(1 / 20), True)
    assert stats.two_sample_permutation([0.5, 0.6, 0.7], [0.65], "less")[0] == pytest.approx(0.5)


def test_two_sample_on_successes_is_fishers_test():
    # 0/1 values: the sum of arm a under relabelling is hypergeometric, exactly Fisher's exact test (20 vs 20).
    a, b = [1.0] * 14 + [0.0] * 6, [1.0] * 8 + [0.0] * 12
    res = stats.two_sample(a, b)
    assert res.exact and res.greater == pytest.approx(stats.fisher_greater(14, 20, 8, 20), rel=1e-12)


def test_holm_adjusts_in_the_order_given():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> made non-decreasing: 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0]) and stats.holm([0.2]) == [0.2] and stats.holm([]) == []
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        stats.holm([1.2])


def test_sign_fisher_and_seeds_needed_known_values():
    assert stats.sign_test([1, 2, 3, 4, 5]) == pytest.approx(1 / 32)
    assert stats.sign_test([1, -1, 0, 1]) == pytest.approx(0.5)  # 2 of 3 nonzero: P(X >= 2) = 4/8
    assert stats.fisher_greater(3, 3, 0, 3) == pytest.approx(1 / math.comb(6, 3))  # the FINDINGS' p = 0.05
    assert stats.seeds_needed(0.1, 0.2) == 25  # ((1.645 + 0.842) * 2)^2 = 24.7
    assert stats.seeds_needed(0.2, 0.01) == 5  # the exact test's floor: 2^-5 < 0.05 <= 2^-4
    assert stats.seeds_needed(-0.1, 0.2) is None and stats.min_exact_seeds(0.01) == 7


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = [0.1, 0.2, 0.3, 0.9, 0.5]
    ci = stats.bootstrap_mean(x, seed=3)
    assert ci == stats.bootstrap_mean(x, seed=3) and ci[0] < sum(x) / len(x) < ci[1]
    assert min(x) <= ci[0] and ci[1] <= max(x)
    assert stats.bootstrap_mean([0.4]) is None and stats.bootstrap_mean([0.4, 0.4]) == (0.4, 0.4)


def test_compare_pairs_on_common_seeds_only():
    c = stats.compare({0: 0.6, 1: 0.7, 2: 0.5}, {0: 0.4, 1: 0.42, 7: 0.9})
    assert c.paired and c.seeds == [0, 1] and c.mean_diff == pytest.approx(0.24) and c.p == pytest.approx(0.25)
    assert c.p_reverse == pytest.approx(1.0) and c.p_two_sided == pytest.approx(0.5)
    u = stats.compare({0: 0.6, 1: 0.7}, {5: 0.4, 6: 0.5})
    assert not u.paired and u.p == pytest.approx(1 / 6)
    assert stats.compare({}, {0: 1.0}) is None

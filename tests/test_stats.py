"""The report's statistics against textbook values and brute-force enumeration."""

import itertools
import math

import pytest

from kava.experiments import stats


def test_clopper_pearson_textbook_values():
    lo, hi = stats.clopper_pearson(3, 10)
    assert lo == pytest.approx(0.0667, abs=1e-4) and hi == pytest.approx(0.6525, abs=1e-4)
    assert stats.clopper_pearson(0, 3) == pytest.approx((0.0, 1 - 0.025 ** (1 / 3)))  # closed form at k = 0
    assert stats.clopper_pearson(10, 10)[1] == 1.0 and stats.clopper_pearson(10, 10)[0] == pytest.approx(0.025 ** 0.1)
    with pytest.raises(ValueError, match="k <= n"):
        stats.clopper_pearson(4, 3)


def _brute_sign_flip(d, greater=True):
    obs = sum(d) / len(d)
    means = [sum(s * x for s, x in zip(signs, d)) / len(d) for signs in itertools.product((1, -1), repeat=len(d))]
    return sum((m >= obs - 1e-12) if greater else (m <= obs + 1e-12) for m in means) / len(means)


@pytest.mark.parametrize("d", [[1, 1, 1, 1, 1], [0.1, 0.2, -0.05, 0.3], [0.02, -0.01, 0.03, -0.04, 0.05, 0.01], [0.3, -0.3]])
def test_paired_permutation_is_the_exact_sign_flip_test(d):
    p, exact = stats.paired_permutation(d)
    assert exact and p == pytest.approx(_brute_sign_flip(d))
    assert stats.paired_permutation(d, "less")[0] == pytest.approx(_brute_sign_flip(d, greater=False))
    assert stats.paired_permutation([0.0, 0.0]) == (1.0, True)


def test_large_paired_samples_use_a_seeded_monte_carlo_draw():
    d = [0.01 * (i % 3 + 1) for i in range(20)]
    p, exact = stats.paired_permutation(d)
    assert not exact and p < 1e-4 and stats.paired_permutation(d) == (p, exact)


def test_two_sample_permutation_counts_relabellings():
    # a = [3, 4, 5] vs b = [0, 1, 2]: only the observed split has a mean difference of 3: 1 of C(6, 3) = 20.
    assert stats.two_sample_permutation([3, 4, 5], [0, 1, 2]) == (pytest.approx(1 / 20), True)
    # One value against three: 4 relabellings, 2 at or below the observed -0.05.
    assert stats.two_sample_permutation([0.5, 0.6, 0.7], [0.65], "less")[0] == pytest.approx(0.5)


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
    u = stats.compare({0: 0.6, 1: 0.7}, {5: 0.4, 6: 0.5})
    assert not u.paired and u.p == pytest.approx(1 / 6)
    assert stats.compare({}, {0: 1.0}) is None

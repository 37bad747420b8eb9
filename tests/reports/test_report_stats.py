"""The interval code against published worked examples.

Newcombe, R. G. (1998). "Interval estimation for the difference between independent proportions:
comparison of eleven methods." Statistics in Medicine 17, 873-890: Table II, method 10 (the hybrid score
interval, no continuity correction), its eight examples (a)-(h). Examples (a) and (b) are also the
expected values of the R package propint's tests (``ci.two.indep.props``, "produces the results
reported in Newcombe1998").

Newcombe, R. G. (1998). "Two-sided confidence intervals for the single proportion: comparison of seven
methods." Statistics in Medicine 17, 857-872: Table I, method 3 (Wilson score interval without
continuity correction).
"""

from __future__ import annotations

import math

import pytest

from reports import stats

# (x1, n1, x2, n2) -> (lower, upper), rounded to 4 places as published.
NEWCOMBE_TABLE_II_METHOD_10 = [
    ((56, 70, 48, 80), (0.0524, 0.3339)),
    ((9, 10, 3, 10), (0.1705, 0.8090)),
    ((6, 7, 2, 7), (0.0582, 0.8062)),
    ((5, 56, 0, 29), (-0.0381, 0.1926)),
    ((0, 10, 0, 20), (-0.1611, 0.2775)),
    ((0, 10, 0, 10), (-0.2775, 0.2775)),
    ((10, 10, 0, 20), (0.6791, 1.0000)),
    ((10, 10, 0, 10), (0.6075, 1.0000)),
]


@pytest.mark.parametrize(("counts", "published"), NEWCOMBE_TABLE_II_METHOD_10)
def test_newcombe_hybrid_score_interval_matches_table_ii(counts, published):
    x1, n1, x2, n2 = counts
    estimate = stats.newcombe(x1, n1, x2, n2)
    assert estimate.value == pytest.approx(x1 / n1 - x2 / n2)
    assert (round(estimate.low, 4), round(estimate.high, 4)) == published


@pytest.mark.parametrize(
    ("x", "n", "published"),
    [
        (81, 263, (0.2553, 0.3662)),
        (15, 148, (0.0624, 0.1605)),
        (0, 20, (0.0, 0.1611)),
        (1, 29, (0.0061, 0.1718)),
    ],
)
def test_wilson_interval_matches_newcombe_table_i(x, n, published):
    estimate = stats.wilson(x, n)
    assert (round(estimate.low, 4), round(estimate.high, 4)) == published


def test_empty_groups_have_no_interval():
    assert stats.wilson(0, 0) is None
    assert stats.newcombe(1, 2, 0, 0) is None
    assert stats.two_proportion_p(0, 0, 1, 1) is None
    assert stats.welch(stats.Moments(1, 5.0, 25.0), stats.Moments(3, 6.0, 14.0)) is None


def test_two_proportion_p_value():
    # 56/70 vs 48/80: pooled p = 104/150, z = 0.2 / sqrt(p(1-p)(1/70 + 1/80)) = 2.650; two-sided p = 0.0080.
    pooled = 104 / 150
    z = 0.2 / math.sqrt(pooled * (1 - pooled) * (1 / 70 + 1 / 80))
    assert stats.two_proportion_p(56, 70, 48, 80) == pytest.approx(2 * (1 - stats.NormalDist().cdf(z)))
    assert stats.two_proportion_p(56, 70, 48, 80) == pytest.approx(0.0080, abs=1e-4)
    assert stats.two_proportion_p(0, 10, 0, 20) == 1.0


def test_welch_difference_of_means_normal_approximation():
    # 10, 20, 30 (mean 20, variance 100) against 5, 5, 5, 9 (mean 6, variance 4): se = sqrt(100/3 + 4/4).
    first = stats.Moments(3, 60.0, 1400.0)
    second = stats.Moments(4, 24.0, 156.0)
    estimate = stats.welch(first, second)
    se = math.sqrt(100 / 3 + 1)
    assert estimate.value == pytest.approx(14.0)
    assert (estimate.low, estimate.high) == (
        pytest.approx(14 - 1.959964 * se),
        pytest.approx(14 + 1.959964 * se),
    )

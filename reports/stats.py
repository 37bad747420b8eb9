"""Intervals and p-values of the report, from the standard library (``statistics.NormalDist``).

- :func:`wilson`: the Wilson score interval of one proportion (no continuity correction).
- :func:`newcombe`: the difference of two independent proportions, p1 − p2, with Newcombe's hybrid
  score interval (method 10 of Newcombe, "Interval estimation for the difference between independent
  proportions: comparison of eleven methods", Statistics in Medicine 17, 873–890, 1998): the Wilson
  interval of each proportion, combined as
  ``L = d − sqrt((p1 − l1)² + (u2 − p2)²)``, ``U = d + sqrt((u1 − p1)² + (p2 − l2)²)``.
- :func:`two_proportion_p`: the two-sided p-value of the pooled two-proportion z-test.
- :func:`welch`: the difference of two means with Welch's standard error
  ``sqrt(s1²/n1 + s2²/n2)`` and the normal approximation (z, not Student's t: the report's groups
  are large; with a few dozen orders a group the interval is slightly too narrow).

All take counts (and sums) straight from SQL and return ``None`` where the figure does not exist (an
empty group; a variance from fewer than two values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
_NORMAL = NormalDist()


def z_of(confidence: float = CONFIDENCE) -> float:
    """The two-sided normal quantile: 1.959964 for 95 %."""
    return _NORMAL.inv_cdf(1 - (1 - confidence) / 2)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval (and a p-value where one is defined)."""

    value: float
    low: float
    high: float
    p_value: float | None = None


def proportion(successes: int, n: int) -> float | None:
    return successes / n if n else None


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate | None:
    """The proportion successes / n with its Wilson score interval; None when n is 0."""
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within 0..n, got {successes}/{n}")
    z = z_of(confidence)
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # Clamp the rounding error at the ends (0/n gives exactly 0 as the lower limit in exact arithmetic).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, low, high)


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float | None:
    """Two-sided p-value of H0: p1 = p2 (pooled z-test); 1.0 when every or no one succeeded in both."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return 1.0
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    return 2 * (1 - _NORMAL.cdf(abs(z)))


def newcombe(x1: int, n1: int, x2: int, n2: int, confidence: float = CONFIDENCE) -> Estimate | None:
    """p1 − p2 (x1/n1 − x2/n2) with Newcombe's hybrid score interval (method 10) and the pooled
    z-test's p-value; None when either group is empty."""
    first, second = wilson(x1, n1, confidence), wilson(x2, n2, confidence)
    if first is None or second is None:
        return None
    p1, p2 = first.value, second.value
    d = p1 - p2
    low = d - math.sqrt((p1 - first.low) ** 2 + (second.high - p2) ** 2)
    high = d + math.sqrt((first.high - p1) ** 2 + (p2 - second.low) ** 2)
    return Estimate(d, max(-1.0, low), min(1.0, high), two_proportion_p(x1, n1, x2, n2))


@dataclass(frozen=True)
class Moments:
    """n values, their sum and their sum of squares, as SQL returns them."""

    n: int
    total: float
    squares: float

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """The sample variance (n − 1); None under two values."""
        if self.n < 2:
            return None
        # max(0, ...): the rounding error of sum of squares minus n·mean² can be a tiny negative.
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))

    @property
    def sd(self) -> float | None:
        variance = self.variance
        return math.sqrt(variance) if variance is not None else None


def welch(first: Moments, second: Moments, confidence: float = CONFIDENCE) -> Estimate | None:
    """mean(first) − mean(second) with a Welch standard error and the normal approximation; the
    p-value of H0: equal means. None when a group has fewer than two values."""
    v1, v2 = first.variance, second.variance
    if v1 is None or v2 is None:
        return None
    d = first.total / first.n - second.total / second.n
    se = math.sqrt(v1 / first.n + v2 / second.n)
    if se == 0:
        return Estimate(d, d, d, 1.0 if d == 0 else 0.0)
    z = z_of(confidence)
    return Estimate(d, d - z * se, d + z * se, 2 * (1 - _NORMAL.cdf(abs(d) / se)))

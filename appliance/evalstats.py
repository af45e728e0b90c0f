"""The statistics of the evaluation gate: a paired, exact comparison of two models' answers.

Pure functions, numbers in and numbers out (docs/adr/0020-evaluation-gate.md). Two slots
answer the same items; each item is a pair (old right?, new right?). Only the discordant pairs
carry information about which model is better: ``regressed`` items the old model got right and
the new one wrong, ``improved`` the other way round. Under "the models are equally good" each
discordant pair is a fair coin, so the number of regressions among the ``m`` discordant pairs
is Binomial(m, 1/2): the exact McNemar test, computed here with integers (no scipy, no
normal approximation, exact for any ``m`` the gate allows).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from statistics import NormalDist


def _upper_count(n: int, k: int) -> int:
    """sum(C(n, i) for i in k..n), 1 <= k <= n, each term from the last (no comb from scratch)."""
    term, total = 1, 1  # C(n, n)
    for i in range(n, k, -1):
        term = term * i // (n - i + 1)  # C(n, i - 1)
        total += term
    return total


def binomial_upper_tail_half(n: int, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly (integer sums, one rounding at the end);
    the shorter side is summed (the distribution is symmetric), so at most n/2 + 1 terms."""
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if 2 * k > n:
        return _upper_count(n, k) / (1 << n)
    below = _upper_count(n, n - k + 1)  # P(X <= k - 1) = P(X >= n - k + 1)
    return ((1 << n) - below) / (1 << n)


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of ``regressed`` against ``improved`` discordant pairs."""

    improved: int  # old wrong, new right
    regressed: int  # old right, new wrong
    p_worse: float  # one-sided: P(at least this many regressions | equally good)
    p_two_sided: float

    @property
    def discordant(self) -> int:
        return self.improved + self.regressed


def mcnemar_exact(*, improved: int, regressed: int) -> McNemar:
    """The exact (conditional, binomial) McNemar test on the discordant pairs.

    ``p_worse`` is the one-sided p-value for "the new model is worse": P(X >= regressed) with
    X ~ Binomial(improved + regressed, 1/2). ``p_two_sided`` doubles the smaller tail, capped
    at 1 (the convention of R's ``binom.test`` and of ``statsmodels``' exact ``mcnemar`` for
    p = 1/2, where the distribution is symmetric). No discordant pairs: both are 1.
    """
    if improved < 0 or regressed < 0:
        raise ValueError("counts must be >= 0")
    m = improved + regressed
    p_worse = binomial_upper_tail_half(m, regressed)
    smaller = min(regressed, improved)
    p_two = min(1.0, 2 * binomial_upper_tail_half(m, m - smaller)) if m else 1.0
    return McNemar(improved=improved, regressed=regressed, p_worse=p_worse, p_two_sided=p_two)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by the nearest-rank method: a value that was measured."""
    if not values:
        raise ValueError("no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], not {q}")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# -- how many items a drop needs to be seen (the table of docs/adr/0020) ---------------------


@functools.lru_cache(maxsize=65536)
def _critical(m: int, alpha: float) -> int:
    """The smallest k with P(Binomial(m, 1/2) >= k) <= alpha (m + 1 when there is none);
    integers throughout (alpha as an exact fraction), so any m works."""
    level = Fraction(alpha)
    tail = 1 << m
    k, running, term = m + 1, 0, 1  # term: C(m, k - 1)
    while k > 0:
        above = running + term
        if above * level.denominator > level.numerator * tail:
            break
        running, k = above, k - 1
        term = term * k // (m - k + 1) if k > 0 else 0
    return k


def _binomial_pmf(n: int, k: int, p: float) -> float:
    if p <= 0.0:
        return 1.0 if k == 0 else 0.0
    if p >= 1.0:
        return 1.0 if k == n else 0.0
    log = (
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
    )
    return math.exp(log)


def _upper_tail(n: int, k: int, p: float) -> float:
    """P(X >= k), X ~ Binomial(n, p), by summing the pmf (fine for the sizes tabled)."""
    if k <= 0:
        return 1.0
    return sum(_binomial_pmf(n, i, p) for i in range(k, n + 1))


def exact_power(n: int, *, drop: float, discordance: float, alpha: float) -> float:
    """The power of the one-sided exact McNemar test at level ``alpha`` with ``n`` items,
    when the new model is worse by ``drop`` (a fraction: 0.05 is 5 points) and a share
    ``discordance`` of the items is answered right by exactly one of the two models.

    The discordant count M is Binomial(n, discordance); given M = m, the regressions are
    Binomial(m, (discordance + drop) / (2 discordance)); the test rejects when they reach the
    critical value of Binomial(m, 1/2). Exact, summed over the m that matter (8 standard
    deviations around the mean).
    """
    if not 0 < drop <= discordance <= 1:
        raise ValueError("need 0 < drop <= discordance <= 1")
    q = (discordance + drop) / (2 * discordance)
    mean = n * discordance
    spread = 8 * math.sqrt(max(mean * (1 - discordance), 1.0))
    low, high = max(0, int(mean - spread)), min(n, int(mean + spread) + 1)
    power = 0.0
    for m in range(low, high + 1):
        weight = _binomial_pmf(n, m, discordance)
        if weight < 1e-15:
            continue
        power += weight * _upper_tail(m, _critical(m, alpha), q)
    return power


def approximate_items(*, drop: float, discordance: float, alpha: float, power: float) -> int:
    """Items needed by the normal approximation to the paired test (Connor, 1987):
    n = (z_a sqrt(d) + z_b sqrt(d - drop^2))^2 / drop^2, one-sided."""
    z = NormalDist().inv_cdf
    za, zb = z(1 - alpha), z(power)
    root = za * math.sqrt(discordance) + zb * math.sqrt(discordance - drop * drop)
    return math.ceil(root * root / (drop * drop))


def exact_items(*, drop: float, discordance: float, alpha: float, power: float) -> int:
    """The smallest n, on a grid of 0.5% of the normal approximation's answer, from which the
    exact test's power stays at or above ``power`` for the next five grid points (exact power
    saw-tooths with n, so "the first n that reaches it" would overstate what a set can do)."""
    guess = approximate_items(drop=drop, discordance=discordance, alpha=alpha, power=power)
    step = max(1, guess // 200)
    n = max(1, guess // 4)

    seen: dict[int, bool] = {}

    def enough(k: int) -> bool:
        if k not in seen:
            seen[k] = exact_power(k, drop=drop, discordance=discordance, alpha=alpha) >= power
        return seen[k]

    while not all(enough(n + i * step) for i in range(6)):
        n += step
    return n

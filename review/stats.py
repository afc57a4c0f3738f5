"""Two-proportion z-test and the A/B verdict built on it.

The test (pooled standard error, two-sided, normal approximation) is the textbook one for comparing two rates
such as click-through rates::

    p1 = x1/n1, p2 = x2/n2, p = (x1 + x2) / (n1 + n2)
    se = sqrt(p (1 - p) (1/n1 + 1/n2)),  z = (p1 - p2) / se,  p-value = erfc(|z| / sqrt(2))

A test with more than two groups names a winner only if the leading group beats *every* other group at
``alpha / (k - 1)`` (Bonferroni), so adding groups does not make a false winner more likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Arm", "Verdict", "ZTest", "two_proportion_z_test", "verdict"]


@dataclass(frozen=True)
class ZTest:
    z: float
    p_value: float  # two-sided
    rate_a: float
    rate_b: float
    lift: float | None  # (rate_a - rate_b) / rate_b; None when rate_b is 0


def two_proportion_z_test(successes_a: int, trials_a: int, successes_b: int, trials_b: int) -> ZTest:
    """Compare rate A with rate B. Both groups need at least one trial; successes must lie in 0..trials."""
    for s, n, name in ((successes_a, trials_a, "A"), (successes_b, trials_b, "B")):
        if n <= 0:
            raise ValueError(f"group {name} has no trials")
        if not 0 <= s <= n:
            raise ValueError(f"group {name}: {s} successes out of {n} trials")
    rate_a, rate_b = successes_a / trials_a, successes_b / trials_b
    pooled = (successes_a + successes_b) / (trials_a + trials_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / trials_a + 1 / trials_b))
    lift = (rate_a - rate_b) / rate_b if rate_b > 0 else None
    if se == 0:
        # Both rates are 0 or both are 1: the data cannot tell the groups apart.
        return ZTest(z=0.0, p_value=1.0, rate_a=rate_a, rate_b=rate_b, lift=lift)
    z = (rate_a - rate_b) / se
    return ZTest(z=z, p_value=math.erfc(abs(z) / math.sqrt(2)), rate_a=rate_a, rate_b=rate_b, lift=lift)


@dataclass(frozen=True)
class Arm:
    name: str  # the A/B group
    successes: int  # clicks or conversions
    trials: int  # impressions


@dataclass(frozen=True)
class Verdict:
    winner: str | None  # None: no group is significantly better at the configured confidence
    leader: str | None  # the group with the highest rate (None when fewer than two groups have data)
    runner_up: str | None
    p_value: float | None  # leader vs. runner-up
    lift: float | None  # leader vs. runner-up, relative
    alpha: float  # the significance level each comparison was held to (Bonferroni-adjusted)
    reason: str


def verdict(arms: list[Arm], confidence: float) -> Verdict:
    """Name the winner of one A/B test, or say why there is none."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    usable = [a for a in arms if a.trials > 0]
    if len(usable) < 2:
        return Verdict(None, None, None, None, None, 1 - confidence, "needs results for at least two groups")
    # Highest rate first; ties broken by name so the verdict does not depend on input order.
    ranked = sorted(usable, key=lambda a: (-a.successes / a.trials, a.name))
    leader, runner_up = ranked[0], ranked[1]
    alpha = (1 - confidence) / (len(ranked) - 1)
    tests = [two_proportion_z_test(leader.successes, leader.trials, o.successes, o.trials) for o in ranked[1:]]
    head = tests[0]
    if head.rate_a == head.rate_b:
        return Verdict(None, leader.name, runner_up.name, head.p_value, head.lift, alpha, "the leading groups are tied")
    worst = max(t.p_value for t in tests)
    if worst < alpha:
        return Verdict(leader.name, leader.name, runner_up.name, head.p_value, head.lift, alpha,
                       f"p < {alpha:.4g} against every other group")
    return Verdict(None, leader.name, runner_up.name, head.p_value, head.lift, alpha,
                   f"not significant at {confidence:.0%} confidence (p = {worst:.4g} >= {alpha:.4g})")

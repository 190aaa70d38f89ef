"""How sure a measured rate is: Wilson intervals for a share, McNemar's exact test for two models scored on the
same items. Small suites give wide intervals; evaluate reports them so that a difference is read by its interval
and its p-value, not by its third decimal."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95 %


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """95 % Wilson score interval of a share `successes / n`; None for an empty suite (no rate to bound)."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a: list[bool], b: list[bool]) -> float | None:
    """Two-sided exact McNemar p-value that `a` and `b` (the same items, scored for two models) succeed equally
    often: a binomial test on the items where exactly one of them succeeds. None without items; 1.0 when no
    item tells them apart."""
    if len(a) != len(b):
        raise ValueError(f"paired flags of different lengths: {len(a)} and {len(b)}")
    if not a:
        return None
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def paired_bootstrap(a: list[float], b: list[float], rounds: int = 2000, seed: int = 0) -> dict | None:
    """Mean of a - b over paired items with a 95 % percentile bootstrap interval (resampling items)."""
    import random

    if len(a) != len(b):
        raise ValueError(f"paired values of different lengths: {len(a)} and {len(b)}")
    if not a:
        return None
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(rounds))
    return {"diff": sum(diffs) / len(diffs), "low": means[int(0.025 * rounds)], "high": means[int(0.975 * rounds) - 1]}


def rate(flags: list[bool]) -> dict:
    """A share with its n and 95 % Wilson interval; value None (n/a) for an empty suite."""
    n = len(flags)
    interval = wilson(sum(flags), n)
    return {"value": sum(flags) / n if n else None, "n": n, "low": interval and interval[0],
            "high": interval and interval[1]}

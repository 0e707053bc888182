"""Small statistics shared by the monitor, the evaluation report and the gate (numpy/scipy only)."""

from __future__ import annotations

import functools
import math

from scipy.stats import norm


@functools.lru_cache(maxsize=64)
def z_value(confidence: float) -> float:
    """Two-sided normal quantile for a confidence level in (0, 1) (cached: scipy's ppf costs
    ~0.2 ms a call, and every cell of every model asks for the same few levels on each tick)."""
    return float(norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    z = z_value(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)

"""Shared builders for the monitor's unit tests (simulated labeled streams, configs)."""

from __future__ import annotations

from typing import Any

import numpy as np

from patchd.config import Config, build_config
from patchd.monitor.window import LabeledEvents

CLASSES = ["a", "b"]


def monitor_config(**monitor: Any) -> Config:
    return build_config(
        {
            "model": {"name": "m", "class_names": CLASSES},
            "groups": {"attributes": ["site"], "values": {"site": ["A", "B", "C"]}},
            "monitor": {"cooldown_s": 0, **monitor},
        }
    )


def simulate(
    rng: np.random.Generator, n: int, acc: np.ndarray, shares: np.ndarray, t0: float = 0.0
) -> LabeledEvents:  # noqa: E501
    """n labeled events: group ~ shares, uniform labels, correct w.p. acc[label, group]."""
    g = rng.choice(len(shares), n, p=shares)
    y = rng.integers(0, acc.shape[0], n)
    ok = rng.random(n) < acc[y, g]
    ts = t0 + np.arange(n, dtype=np.float64)
    conf = rng.uniform(0.5, 1.0, n)
    return LabeledEvents(ts, ts.copy(), np.where(ok, y, 1 - y), y, conf, g.astype(np.int64))

"""The simulated labeled stream ``patchd bench monitor`` and its detector comparison share.

2 classes x 12 subgroups; the affected subgroup holds 5% of traffic at accuracy 0.90, the other
cells' accuracies are drawn once per seed in [0.80, 0.97].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_GROUPS = 12
AFFECTED = 0
SHARE = 0.05
CLASSES = ["0", "1"]
GROUPS = [f"g=g{i:02d}" for i in range(N_GROUPS)]


@dataclass(frozen=True)
class Stream:
    acc: np.ndarray  # [K, G]
    shares: np.ndarray  # [G]


def base_stream(seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.80, 0.97, size=(2, N_GROUPS))
    acc[:, AFFECTED] = 0.90
    shares = np.full(N_GROUPS, (1 - SHARE) / (N_GROUPS - 1))
    shares[AFFECTED] = SHARE
    return Stream(acc, shares)

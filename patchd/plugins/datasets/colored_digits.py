"""``colored-digits``: scikit-learn's bundled 8x8 digits, digit < 5 vs >= 5, coloured background.

1797 images, split by a seeded permutation into train 50% / val 25% / test 25%, upsampled to
``image_size`` (default 16). Background colour = class with p = ``options.p_train`` (0.99) in
train and ``options.p_eval`` (0.5) in val and test. Loads in well under a second: the dataset of
the tests and of ``patchd demo --fast``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from patchd.config import DatasetSpec
from patchd.exceptions import DependencyMissingError
from patchd.ml.data import Splits
from patchd.ml.datasets import (
    P_EVAL,
    P_TRAIN,
    colored_set,
    image_size,
    option,
    resize_gray,
    split_rng,
)

CLASS_NAMES = ("0-4", "5-9")


def _digits_file() -> Path:
    """sklearn's bundled digits table, found without importing sklearn (a 2 s import)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DependencyMissingError(
            "colored-digits needs scikit-learn's bundled digits: pip install 'patchd[worker]'"
        )
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DependencyMissingError(
            f"scikit-learn is installed but {path} is missing; reinstall it"
        )
    return path


def _digits() -> tuple[np.ndarray, np.ndarray]:
    table = np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 8, 8) / 16.0
    return images, table[:, -1].astype(np.int64)


def load(spec: DatasetSpec) -> Splits:
    images, digits = _digits()
    order = np.random.default_rng(spec.seed).permutation(len(digits))
    n_train, n_val = len(order) // 2, len(order) // 4
    parts = {
        "train": order[:n_train][: spec.n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    size = image_size(spec)
    p = {"train": option(spec, "p_train", P_TRAIN)}
    p["val"] = p["test"] = option(spec, "p_eval", P_EVAL)
    sets = {}
    for i, (name, idx) in enumerate(parts.items()):
        gray = resize_gray(torch.from_numpy(images[idx]), size)
        y = (digits[idx] >= 5).astype(np.int64)
        ids = tuple(f"digits:{name}:{j}" for j in idx.tolist())
        sets[name] = colored_set(gray, y, p[name], split_rng(spec.seed, i), CLASS_NAMES, ids)
    return Splits(train=sets["train"], val=sets["val"], test=sets["test"])

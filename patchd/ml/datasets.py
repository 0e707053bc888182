"""Datasets: one registry of kinds, and the shared colour construction of the built-in ones.

``load_splits(spec)`` dispatches on ``spec.kind`` to a loader in ``patchd.plugins.datasets``
(one module per kind, registered in :data:`DATASETS`), each returning :class:`Splits` of
:class:`ImageSet` with subgroup labels.

The built-in *colored* datasets follow the Colored-MNIST / MNIST-Correlation construction: a
binary task on grayscale images whose background is painted red or green, with the colour equal
to the class ("class 0 → red, class 1 → green") with probability ``p`` (0.99 in train, 0.5 in
val and test by default). The 4 cells are (class, colour); the minority colour of each class is
the failing subgroup of a model that learned the shortcut.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from patchd.exceptions import ConfigError
from patchd.ml.data import ImageSet, Splits
from patchd.ml.models import resolve_callable

if TYPE_CHECKING:
    from patchd.config import DatasetSpec

log = logging.getLogger(__name__)

DATASETS: dict[str, str] = {
    "colored-digits": "patchd.plugins.datasets.colored_digits:load",
    "colored-fmnist": "patchd.plugins.datasets.colored_fmnist:load",
    "image-csv": "patchd.plugins.datasets.image_csv:load",
    "sticker-fmnist": "patchd.plugins.datasets.sticker_fmnist:load",
    "texture-fmnist": "patchd.plugins.datasets.texture_fmnist:load",
    "wilds-metadata": "patchd.plugins.datasets.wilds_metadata:load",
}

# image side used when ``spec.image_size`` is None
NATIVE_SIZES: dict[str, int] = {
    "colored-digits": 16,
    "colored-fmnist": 28,
    "image-csv": 64,
    "sticker-fmnist": 28,
    "texture-fmnist": 28,
    "wilds-metadata": 64,
}

COLOR_NAMES: tuple[str, ...] = ("red", "green")
PALETTE = torch.tensor([[0.95, 0.15, 0.15], [0.15, 0.80, 0.20]])  # background RGB per colour
COLOR_GROUPS: tuple[str, ...] = tuple(f"color={c}" for c in COLOR_NAMES)
P_TRAIN = 0.99
P_EVAL = 0.5


def load_splits(spec: DatasetSpec) -> Splits:
    """Train/val/test splits of the dataset ``spec`` describes."""
    path = DATASETS.get(spec.kind)
    if path is None:
        raise ConfigError(f"data kind {spec.kind!r} is unknown; known kinds: {sorted(DATASETS)}")
    loader: Callable[[DatasetSpec], Splits] = resolve_callable(path)
    splits = loader(spec)
    log.info(
        "dataset %s: train %d, val %d, test %d, groups %s",
        spec.kind,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.train.group_names,
    )
    return splits


def image_size(spec: DatasetSpec) -> int:
    """The square side images of ``spec`` load at (the kind's native size when unset)."""
    return spec.image_size or NATIVE_SIZES.get(spec.kind, 64)


def option(spec: DatasetSpec, name: str, default: float) -> float:
    """A numeric entry of ``spec.options`` with a clear error when it is not a number."""
    value = spec.options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"data options.{name} must be a number, got {value!r}")
    return float(value)


def split_rng(seed: int, split: int) -> np.random.Generator:
    return np.random.default_rng([seed, split])


def assign_colors(y: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """Colour index per example: the class's own colour, except round((1-p)*n_c) random ones."""
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"colour correlation p must lie in [0, 1], got {p}")
    colors = y.astype(np.int64).copy()
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        n_minor = int(round((1.0 - p) * len(idx)))
        flip = rng.choice(idx, size=n_minor, replace=False) if n_minor else idx[:0]
        colors[flip] = 1 - c
    return colors


def resize_gray(gray: torch.Tensor, size: int) -> torch.Tensor:
    """[N, H, W] in [0, 1] → [N, size, size] (bilinear, antialiased when shrinking)."""
    if gray.shape[-1] == size and gray.shape[-2] == size:
        return gray
    out = torch.nn.functional.interpolate(
        gray[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return out[:, 0].clamp(0.0, 1.0)


def paint(gray: torch.Tensor, colors: np.ndarray) -> torch.Tensor:
    """White object on a coloured background: [N, H, W] → [N, 3, H, W]."""
    bg = PALETTE[torch.as_tensor(colors, dtype=torch.long)][:, :, None, None]
    g = gray[:, None]
    return (g + (1.0 - g) * bg).clamp(0.0, 1.0).contiguous()


def colored_set(
    gray: torch.Tensor,
    y: np.ndarray,
    p: float,
    rng: np.random.Generator,
    class_names: tuple[str, str],
    ids: tuple[str, ...],
) -> ImageSet:
    """Binary labels ``y`` + grayscale images → a colour-correlated :class:`ImageSet`."""
    colors = assign_colors(y, p, rng)
    return ImageSet(
        x=paint(gray.float(), colors),
        y=torch.as_tensor(y, dtype=torch.int64),
        g=torch.as_tensor(colors, dtype=torch.int64),
        class_names=class_names,
        group_names=COLOR_GROUPS,
        ids=ids,
    )

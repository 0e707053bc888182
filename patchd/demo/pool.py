"""The production traffic pool: held-out images the base model never trained on, recoloured at will.

Production images come from the dataset's *val* split (the evaluate stage holds out *test*), cut
in two disjoint halves: the stream before promotion draws from the first, the stream after
promotion from the second, so the patched model is never scored live on images that reached it
through the production slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchd.ml.data import ImageSet
from patchd.ml.datasets import COLOR_NAMES, PALETTE, paint


@dataclass(frozen=True)
class Draw:
    gray: torch.Tensor  # [H, W] in [0, 1]
    label: int
    color: int  # index into COLOR_NAMES

    @property
    def color_name(self) -> str:
        return COLOR_NAMES[self.color]

    @property
    def minority(self) -> bool:
        return self.color != self.label


def ungray(x: torch.Tensor) -> torch.Tensor:
    """Recover the grayscale object from a painted image ([N, 3, H, W] → [N, H, W]).

    Painting is ``g + (1 - g) * bg`` per channel; the smaller of the red and green channels is
    the one whose background value is 0.15 for both palette colours.
    """
    low = float(PALETTE[0, 1])  # red's green channel == green's red channel
    channel = torch.minimum(x[:, 0], x[:, 1])
    return ((channel - low) / (1.0 - low)).clamp(0.0, 1.0)


class ProductionPool:
    """Draws (image, label, colour) with a chosen share of minority-coloured examples."""

    def __init__(self, images: ImageSet, seed: int) -> None:
        self.gray = ungray(images.x)
        self.y = images.y.numpy()
        self.rng = np.random.default_rng(seed)
        self.by_class = [np.flatnonzero(self.y == c) for c in (0, 1)]

    def halves(self) -> tuple[ProductionPool, ProductionPool]:
        """Two disjoint pools (before / after promotion)."""
        order = np.random.default_rng(1234).permutation(len(self.y))
        cut = len(order) // 2
        return self._subset(order[:cut], 1), self._subset(order[cut:], 2)

    def _subset(self, index: np.ndarray, seed: int) -> ProductionPool:
        pool = object.__new__(ProductionPool)
        pool.gray, pool.y = self.gray[index], self.y[index]
        pool.rng = np.random.default_rng(seed)
        pool.by_class = [np.flatnonzero(pool.y == c) for c in (0, 1)]
        return pool

    def draw(self, minority_share: float) -> Draw:
        label = int(self.rng.integers(2))
        i = int(self.rng.choice(self.by_class[label]))
        color = 1 - label if self.rng.random() < minority_share else label
        return Draw(self.gray[i], label, color)


def write_png(draw: Draw, path: Path) -> None:
    """The drawn image painted in its colour, as an 8-bit RGB PNG (atomic write)."""
    from PIL import Image

    rgb = paint(draw.gray[None], np.array([draw.color]))[0]
    array = (rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    tmp = path.with_suffix(".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)

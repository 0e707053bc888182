"""The ``none`` augmenter: the trainer sees only the real data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from patchd.abc import Augmentation, Augmenter, StageContext

if TYPE_CHECKING:
    import torch

    from patchd.ml.data import ImageSet


class NoneAugmenter(Augmenter):
    """The ``none`` augmenter: synthesizes nothing (the trainer sees only the real data)."""

    def synthesize(
        self, ctx: StageContext, model: torch.nn.Module, train: ImageSet
    ) -> Augmentation:
        return Augmentation(kind="none", info={"reason": "patch.augmenter is 'none'"})

"""How good are Defuse's failure regions: spread, novelty and realism of the decoded samples.

- **spread**: mean pairwise L2 distance (pixels) between a region's samples, read against the
  same figure for real training images of the region's source class. Samples that collapse to
  one image have spread 0; a region worth labelling has a sizeable fraction of the real spread.
- **novelty**: median distance from a region sample to its nearest *misclassified real* training
  image, divided by the median nearest-neighbour distance between real training images. Above 1
  the region lies further from every known mistake than real images lie from each other: an error
  the misclassified training data does not show.
- **realism**: Fréchet distance between the incumbent's penultimate features of generated images
  and of real images (an FID with the incumbent as the feature extractor), read against the same
  distance between two disjoint sets of real images of the same size.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().float().flatten(1)


def mean_pairwise(x: torch.Tensor, max_rows: int = 256) -> float:
    """Mean L2 distance between distinct rows of ``x`` (first ``max_rows`` rows); 0 for < 2 rows."""
    flat = _flat(x[:max_rows])
    n = flat.shape[0]
    if n < 2:
        return 0.0
    d = torch.cdist(flat, flat)
    return float(d.sum() / (n * (n - 1)))


def nearest(a: torch.Tensor, b: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """Per row of ``a``: L2 distance to its nearest row of ``b`` (``inf`` when ``b`` is empty)."""
    fa, fb = _flat(a), _flat(b)
    if fb.shape[0] == 0 or (exclude_self and fb.shape[0] < 2):
        return torch.full((fa.shape[0],), float("inf"))
    out = []
    for chunk in torch.split(torch.arange(fa.shape[0]), 512):
        d = torch.cdist(fa[chunk], fb)
        if exclude_self:
            d[torch.arange(len(chunk)), chunk] = float("inf")
        out.append(d.min(1).values)
    return torch.cat(out)


def novelty(samples: torch.Tensor, mistakes: torch.Tensor, real: torch.Tensor) -> float:
    """Median sample → nearest misclassified real image distance over the median real → real
    nearest-neighbour distance (NaN when there are no misclassified real images)."""
    if mistakes.shape[0] == 0 or real.shape[0] < 2:
        return float("nan")
    to_mistake = float(nearest(samples, mistakes).median())
    real_nn = float(nearest(real, real, exclude_self=True).median())
    return to_mistake / max(real_nn, 1e-12)


def frechet(fa: np.ndarray, fb: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]."""
    from scipy import linalg

    if len(fa) < 2 or len(fb) < 2:
        return float("nan")
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ca, cb = np.atleast_2d(ca), np.atleast_2d(cb)
    with warnings.catch_warnings():  # few samples per region: a singular product is expected
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(ca @ cb)
    if isinstance(covmean, tuple):  # older scipy returns (sqrtm, error)
        covmean = covmean[0]
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2.0 * np.real(covmean)))
    return max(0.0, value) if math.isfinite(value) else float("nan")


@torch.no_grad()
def feature_matrix(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The incumbent's penultimate features of ``x`` as a float64 array."""
    from patchd.ml.models import features

    return features(model, x).double().cpu().numpy()

"""``texture-fmnist``: a texture-feature set at a hard Fashion-MNIST class pair.

The same pairs and splits as ``sticker-fmnist`` (:mod:`patchd.plugins.datasets.sticker_fmnist`),
but the group feature is a *texture on the garment*: striped garments have their pixels
modulated by diagonal stripes, ``x = gray * (1 - depth * stripe)``, with a period of 3 or 4 px
and a phase drawn at random per image (so no fixed pixel pattern identifies the group). Stripes
are correlated with the label as the sticker is: class 1 is striped and class 0 plain with
probability ``p_train`` (0.95) in train and ``p_eval`` (0.5) in val and test. Groups:
``texture=plain`` (0) and ``texture=striped`` (1). Grey on black, replicated to 3 channels.

``data.train: {kind: texture-fmnist, options: {pair, p_train, p_eval, depth, n_val, n_test}}``;
everything is a deterministic function of ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from patchd.config import DatasetSpec
from patchd.exceptions import ConfigError
from patchd.ml.data import ImageSet, Splits
from patchd.ml.datasets import assign_colors, image_size, option, split_rng
from patchd.plugins.datasets.sticker_fmnist import P_EVAL, P_TRAIN, PAIRS, pair_parts

GROUP_NAMES = ("texture=plain", "texture=striped")
KNOWN_OPTIONS = {"pair", "p_train", "p_eval", "depth", "n_val", "n_test"}


def stripes(n: int, side: int, rng: np.random.Generator) -> torch.Tensor:
    """[N, side, side] diagonal stripe masks in {0, 1}, random period (3 or 4) and phase."""
    period = rng.integers(3, 5, size=n)[:, None, None]
    phase = rng.integers(0, 4, size=n)[:, None, None]
    rows, cols = np.mgrid[0:side, 0:side]
    on = ((rows[None] + cols[None] + phase) % period) == 0
    return torch.from_numpy(on.astype(np.float32))


def _texture(
    gray: torch.Tensor, has: np.ndarray, depth: float, rng: np.random.Generator
) -> torch.Tensor:
    n, h, _ = gray.shape
    mod = 1.0 - depth * stripes(n, h, rng) * torch.from_numpy(has.astype(np.float32))[:, None, None]
    return (gray * mod)[:, None].expand(n, 3, h, h).contiguous()


def make_texture_fmnist(
    root: Path | None = None,
    *,
    pair: str = "tshirt-shirt",
    n_train: int | None = None,
    n_val: int = 1000,
    n_test: int = 1000,
    p_train: float = P_TRAIN,
    p_eval: float = P_EVAL,
    depth: float = 0.6,
    image_size: int = 28,
    seed: int = 0,
) -> Splits:
    """The texture set (module docstring); ``root`` holds the Fashion-MNIST IDX files."""
    if pair not in PAIRS:
        raise ConfigError(f"texture-fmnist pair {pair!r} is unknown; known: {sorted(PAIRS)}")
    if not 0.0 < depth <= 1.0:
        raise ConfigError(f"texture-fmnist depth must lie in (0, 1], got {depth}")
    names = PAIRS[pair][1]
    sets: dict[str, ImageSet] = {}
    for i, part in enumerate(pair_parts(root, pair, n_train, n_val, n_test, p_train, p_eval, seed)):
        name, idx, y, source = part.name, part.idx, part.y, part.source
        split = split_rng(seed, 20 + i)
        gray = part.gray(image_size)
        has = assign_colors(y, part.p, split)  # 1 = striped; equals the class except the minority
        sets[name] = ImageSet(
            x=_texture(gray, has, depth, split),
            y=torch.as_tensor(y),
            g=torch.as_tensor(has, dtype=torch.int64),
            class_names=names,
            group_names=GROUP_NAMES,
            ids=tuple(f"fmnist:{source}:{j}" for j in idx.tolist()),
        )
    return Splits(train=sets["train"], val=sets["val"], test=sets["test"])


def load(spec: DatasetSpec) -> Splits:
    """The ``texture-fmnist`` dataset kind (``spec.options``: see the module docstring)."""
    unknown = set(spec.options) - KNOWN_OPTIONS
    if unknown:
        raise ConfigError(
            f"data options {sorted(unknown)} are unknown for texture-fmnist; "
            f"known: {sorted(KNOWN_OPTIONS)}"
        )
    pair = spec.options.get("pair", "tshirt-shirt")
    if not isinstance(pair, str):
        raise ConfigError(f"data options.pair must be a string, got {pair!r}")
    return make_texture_fmnist(
        Path(spec.root) if spec.root is not None else None,
        pair=pair,
        n_train=spec.n_train,
        n_val=int(option(spec, "n_val", 1000)),
        n_test=int(option(spec, "n_test", 1000)),
        p_train=option(spec, "p_train", P_TRAIN),
        p_eval=option(spec, "p_eval", P_EVAL),
        depth=float(option(spec, "depth", 0.6)),
        image_size=image_size(spec),
        seed=spec.seed,
    )

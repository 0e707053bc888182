"""``sticker-fmnist``: a localized-feature set at a hard Fashion-MNIST class pair.

Two garment classes that are hard to tell apart (default: class 0 ``T-shirt/top`` = Fashion-MNIST
label 0, class 1 ``shirt`` = label 6; ``pair="pullover-coat"`` gives labels 2 and 4). Some images
carry a small coloured square (the *sticker*, ``sticker_size`` px, default 5, orange) pasted at a
position drawn uniformly at random over the whole image, so no pixel location identifies it.
Sticker presence is correlated with the label: class 1 has the sticker and class 0 does not with
probability ``p_train`` (0.95) in train and ``p_eval`` (0.5) in val and test; exactly
``round((1 - p) * n_c)`` examples per class are flipped. Groups: ``sticker=no`` (0) and
``sticker=yes`` (1), so the minority cells are ``g != y`` as in the colored sets. The garment is
grey on black replicated to 3 channels; the sticker overwrites its pixels.

Splits: train = the pair's images of the official 60000-image train set (12000, or ``n_train``
drawn by seed); val and test = the pair's 2000 official test images shuffled by seed and cut into
halves (``n_val``, ``n_test``, default 1000 each). Everything is a deterministic function of
``seed``: the same arguments give the same pixels, groups and sticker boxes.

Use :func:`make_sticker_fmnist` directly (it also returns the ground-truth sticker box of every
image in :attr:`StickerSplits.boxes`), or through ``data.train: {kind: sticker-fmnist, options:
{pair, p_train, p_eval, sticker_size, n_val, n_test}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchd.config import DatasetSpec
from patchd.exceptions import ConfigError
from patchd.ml.data import ImageSet, Splits
from patchd.ml.datasets import assign_colors, image_size, option, resize_gray, split_rng
from patchd.plugins.datasets.colored_fmnist import _read_part, _root

PAIRS: dict[str, tuple[tuple[int, int], tuple[str, str]]] = {
    "tshirt-shirt": ((0, 6), ("T-shirt/top", "shirt")),
    "pullover-coat": ((2, 4), ("pullover", "coat")),
}
GROUP_NAMES = ("sticker=no", "sticker=yes")
STICKER_RGB = (1.0, 0.55, 0.0)
P_TRAIN = 0.95
P_EVAL = 0.5
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class StickerSplits(Splits):
    """:class:`Splits` plus, per split, each image's sticker box ``(row, col, size)`` (or -1s)."""

    boxes: dict[str, np.ndarray]


def _paste(
    gray: torch.Tensor, has: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """Grey [N,H,W] → RGB [N,3,H,W] with a sticker on the rows where ``has``; boxes [N,3]."""
    n, h, w = gray.shape
    x = gray[:, None].expand(n, 3, h, w).clone()
    rows = rng.integers(0, h - size + 1, size=n)
    cols = rng.integers(0, w - size + 1, size=n)
    colour = torch.tensor(STICKER_RGB)[:, None, None]
    boxes = np.full((n, 3), -1, dtype=np.int64)
    for i in np.flatnonzero(has):
        r, c = int(rows[i]), int(cols[i])
        x[i, :, r : r + size, c : c + size] = colour
        boxes[i] = (r, c, size)
    return x.contiguous(), boxes


@dataclass(frozen=True)
class PairPart:
    """One split of a class pair: which official images, their binary labels, the correlation."""

    name: str  # train | val | test
    source: str  # the official part the images come from: train | t10k
    images: np.ndarray  # the whole official part (uint8 [N, 28, 28]); rows ``idx`` are used
    idx: np.ndarray
    y: np.ndarray  # 1 for the pair's second label
    p: float  # P(group feature == class) in this split

    def gray(self, side: int) -> torch.Tensor:
        return resize_gray(torch.from_numpy(self.images[self.idx].astype(np.float32) / 255.0), side)


def pair_parts(
    root: Path | None,
    pair: str,
    n_train: int | None,
    n_val: int,
    n_test: int,
    p_train: float,
    p_eval: float,
    seed: int,
) -> list[PairPart]:
    """The train/val/test images of a hard Fashion-MNIST pair, drawn by ``seed``.

    Train: the pair's images of the official train set (``n_train`` of them by seed); val and
    test: the pair's official test images shuffled by seed and cut into two disjoint parts.
    Shared by the sticker and texture sets, so both use the same images for the same arguments.
    """
    if pair not in PAIRS:
        raise ConfigError(f"pair {pair!r} is unknown; known: {sorted(PAIRS)}")
    (lab0, lab1), _ = PAIRS[pair]
    base = _root(DatasetSpec(kind="colored-fmnist", root=root))
    train_img, train_lab = _read_part(base, "train")
    test_img, test_lab = _read_part(base, "t10k")
    rng = np.random.default_rng(seed)
    pool = np.flatnonzero(np.isin(train_lab, (lab0, lab1)))
    n = len(pool) if n_train is None else min(n_train, len(pool))
    train_idx = np.sort(rng.choice(pool, size=n, replace=False))
    held = rng.permutation(np.flatnonzero(np.isin(test_lab, (lab0, lab1))))
    if n_val + n_test > len(held):
        raise ConfigError(f"n_val + n_test = {n_val + n_test} > {len(held)} test images of {pair}")
    parts = (
        ("train", "train", train_img, train_lab, train_idx, p_train),
        ("val", "t10k", test_img, test_lab, np.sort(held[:n_val]), p_eval),
        ("test", "t10k", test_img, test_lab, np.sort(held[n_val : n_val + n_test]), p_eval),
    )
    return [
        PairPart(name, source, img, idx, (lab[idx] == lab1).astype(np.int64), p)
        for name, source, img, lab, idx, p in parts
    ]


def make_sticker_fmnist(
    root: Path | None = None,
    *,
    pair: str = "tshirt-shirt",
    n_train: int | None = None,
    n_val: int = 1000,
    n_test: int = 1000,
    p_train: float = P_TRAIN,
    p_eval: float = P_EVAL,
    sticker_size: int = 5,
    image_size: int = 28,
    seed: int = 0,
) -> StickerSplits:
    """The sticker set (module docstring); ``root`` holds the Fashion-MNIST IDX files."""
    if pair not in PAIRS:
        raise ConfigError(f"sticker-fmnist pair {pair!r} is unknown; known: {sorted(PAIRS)}")
    if not 1 <= sticker_size <= image_size // 2:
        raise ConfigError(
            f"sticker_size must lie in [1, {image_size // 2}] for {image_size} px images, "
            f"got {sticker_size}"
        )
    names = PAIRS[pair][1]
    sets: dict[str, ImageSet] = {}
    boxes: dict[str, np.ndarray] = {}
    for i, part in enumerate(pair_parts(root, pair, n_train, n_val, n_test, p_train, p_eval, seed)):
        name, idx, y = part.name, part.idx, part.y
        split = split_rng(seed, 10 + i)
        gray = part.gray(image_size)
        has = assign_colors(y, part.p, split)  # 1 = sticker; equals the class except the minority
        x, boxes[name] = _paste(gray, has == 1, sticker_size, split)
        source = part.source
        sets[name] = ImageSet(
            x=x,
            y=torch.as_tensor(y),
            g=torch.as_tensor(has, dtype=torch.int64),
            class_names=names,
            group_names=GROUP_NAMES,
            ids=tuple(f"fmnist:{source}:{j}" for j in idx.tolist()),
        )
    return StickerSplits(train=sets["train"], val=sets["val"], test=sets["test"], boxes=boxes)


def load(spec: DatasetSpec) -> Splits:
    """The ``sticker-fmnist`` dataset kind (``spec.options``: see the module docstring)."""
    known = {"pair", "p_train", "p_eval", "sticker_size", "n_val", "n_test"}
    unknown = set(spec.options) - known
    if unknown:
        raise ConfigError(
            f"data options {sorted(unknown)} are unknown for sticker-fmnist; known: {sorted(known)}"
        )
    pair = spec.options.get("pair", "tshirt-shirt")
    if not isinstance(pair, str):
        raise ConfigError(f"data options.pair must be a string, got {pair!r}")
    return make_sticker_fmnist(
        Path(spec.root) if spec.root is not None else None,
        pair=pair,
        n_train=spec.n_train,
        n_val=int(option(spec, "n_val", 1000)),
        n_test=int(option(spec, "n_test", 1000)),
        p_train=option(spec, "p_train", P_TRAIN),
        p_eval=option(spec, "p_eval", P_EVAL),
        sticker_size=int(option(spec, "sticker_size", 5)),
        image_size=image_size(spec),
        seed=spec.seed,
    )

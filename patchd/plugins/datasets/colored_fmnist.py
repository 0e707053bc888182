"""``colored-fmnist``: Fashion-MNIST (Debian ``dataset-fashion-mnist``), tops vs the rest.

Class 0 ``top`` = T-shirt/top, Pullover, Coat, Shirt (Fashion-MNIST labels 0, 2, 4, 6); class 1
``other`` = Trouser, Dress, Sandal, Sneaker, Bag, Ankle boot (40% / 60% of the images).
Train: ``n_train`` (default 20000) images drawn by seed from the official 60000-image train set;
val and test: the official 10000-image test set shuffled by seed and cut into two disjoint halves
(``options.n_val``, ``options.n_test``, default 5000 each). Background colour = class with
p = ``options.p_train`` (0.99) in train and ``options.p_eval`` (0.5) in val and test.
The IDX files are read from ``spec.root`` or ``/usr/share/datasets/fashion-mnist``.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from patchd.config import DatasetSpec
from patchd.exceptions import DependencyMissingError, StageError
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

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("top", "other")
TOPS = (0, 2, 4, 6)
DEFAULT_N_TRAIN = 20000
# IDX type byte -> numpy dtype (u1 = uint8, i1 = int8; the wider ones big-endian)
IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one (gzipped) IDX file: magic 0x0000TTDD, DD big-endian uint32 dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise StageError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise StageError(f"{path}: IDX header truncated ({len(raw)} bytes for {ndim} dimensions)")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise StageError(
            f"{path}: IDX header says {expected} data bytes, file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(tuple(dims))


def _root(spec: DatasetSpec) -> Path:
    root = Path(spec.root) if spec.root is not None else DEFAULT_ROOT
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        raise DependencyMissingError(
            f"Fashion-MNIST IDX files not found under {root}: install the Debian package "
            "(sudo apt-get install dataset-fashion-mnist) or set data.train.root to a folder "
            "with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-*.gz"
        )
    return root


def _read_part(root: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise StageError(
            f"{root}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels


def load(spec: DatasetSpec) -> Splits:
    root = _root(spec)
    train_img, train_lab = _read_part(root, "train")
    test_img, test_lab = _read_part(root, "t10k")
    n_train = min(spec.n_train or DEFAULT_N_TRAIN, len(train_lab))
    n_val = int(option(spec, "n_val", len(test_lab) // 2))
    n_test = int(option(spec, "n_test", len(test_lab) - n_val))
    if n_val + n_test > len(test_lab):
        raise StageError(f"n_val + n_test = {n_val + n_test} > {len(test_lab)} test images")
    rng = np.random.default_rng(spec.seed)
    train_idx = np.sort(rng.choice(len(train_lab), size=n_train, replace=False))
    held = rng.permutation(len(test_lab))
    parts = {
        "train": (train_img, train_lab, train_idx),
        "val": (test_img, test_lab, np.sort(held[:n_val])),
        "test": (test_img, test_lab, np.sort(held[n_val : n_val + n_test])),
    }
    size = image_size(spec)
    p = {"train": option(spec, "p_train", P_TRAIN)}
    p["val"] = p["test"] = option(spec, "p_eval", P_EVAL)
    sets = {}
    for i, (name, (img, lab, idx)) in enumerate(parts.items()):
        gray = resize_gray(torch.from_numpy(img[idx].astype(np.float32) / 255.0), size)
        y = (~np.isin(lab[idx], TOPS)).astype(np.int64)
        source = "train" if name == "train" else "t10k"
        ids = tuple(f"fmnist:{source}:{j}" for j in idx.tolist())
        sets[name] = colored_set(gray, y, p[name], split_rng(spec.seed, i), CLASS_NAMES, ids)
    return Splits(train=sets["train"], val=sets["val"], test=sets["test"])

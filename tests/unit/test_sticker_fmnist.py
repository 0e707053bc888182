"""``sticker-fmnist``: deterministic, the sticker correlated with the label as documented."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from patchd.config import DatasetSpec
from patchd.exceptions import ConfigError
from patchd.ml.datasets import load_splits
from patchd.plugins.datasets.sticker_fmnist import STICKER_RGB, make_sticker_fmnist

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="needs the Debian package dataset-fashion-mnist",
)


def test_correlation_positions_and_determinism() -> None:
    s = make_sticker_fmnist(n_train=2000, n_val=400, n_test=400, seed=3)
    assert s.train.class_names == ("T-shirt/top", "shirt")
    assert s.train.group_names == ("sticker=no", "sticker=yes")
    for split, p in (("train", 0.95), ("val", 0.5), ("test", 0.5)):
        data, boxes = getattr(s, split), s.boxes[split]
        y, g = data.y.numpy(), data.g.numpy()
        for c in (0, 1):
            agree = (g[y == c] == c).mean()
            assert agree == pytest.approx(p, abs=1.5 / (y == c).sum())
        has = boxes[:, 0] >= 0
        assert (has == (g == 1)).all()
        i = int(np.flatnonzero(has)[0])
        r, col, size = boxes[i]
        patch = data.x[i, :, r : r + size, col : col + size]
        assert torch.allclose(patch, torch.tensor(STICKER_RGB)[:, None, None].expand_as(patch))
        assert not (
            (data.x[~torch.as_tensor(has)] == torch.tensor(STICKER_RGB)[:, None, None])
            .all(dim=1)
            .any()
        )
    rows = s.boxes["train"][s.boxes["train"][:, 0] >= 0]
    assert len(np.unique(rows[:, :2], axis=0)) > 50  # random positions, not a few corners
    again = make_sticker_fmnist(n_train=2000, n_val=400, n_test=400, seed=3)
    assert torch.equal(again.train.x, s.train.x) and again.train.ids == s.train.ids
    other = make_sticker_fmnist(n_train=2000, n_val=400, n_test=400, seed=4)
    assert not torch.equal(other.train.g, s.train.g)


def test_registered_kind_options_and_bad_input() -> None:
    spec = DatasetSpec(
        kind="sticker-fmnist", n_train=500, options={"pair": "pullover-coat", "n_val": 100}
    )
    s = load_splits(spec)
    assert s.train.class_names == ("pullover", "coat") and len(s.val) == 100
    assert s.train.x.shape[1:] == (3, 28, 28)
    with pytest.raises(ConfigError, match="pair 'hat-cap' is unknown"):
        make_sticker_fmnist(pair="hat-cap")
    with pytest.raises(ConfigError, match="unknown for sticker-fmnist"):
        load_splits(DatasetSpec(kind="sticker-fmnist", options={"colour": 1}))
    with pytest.raises(ConfigError, match="sticker_size must lie"):
        make_sticker_fmnist(sticker_size=20)

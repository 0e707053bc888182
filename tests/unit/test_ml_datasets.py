"""Datasets: built-in colored sets (shapes, colour correlation, determinism) and user CSVs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchd.config import DatasetSpec
from patchd.exceptions import ConfigError, DatasetError, DependencyMissingError, StageError
from patchd.ml.datasets import COLOR_GROUPS, load_splits

torch.set_num_threads(1)
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def _agree(ds) -> float:
    return float((ds.g == ds.y).float().mean())


def test_colored_digits_shapes_and_correlation() -> None:
    s = load_splits(DatasetSpec(kind="colored-digits"))
    assert s.train.x.shape[1:] == (3, 16, 16) and s.train.x.dtype == torch.float32
    assert float(s.train.x.min()) >= 0.0 and float(s.train.x.max()) <= 1.0
    assert s.train.group_names == COLOR_GROUPS == ("color=red", "color=green")
    assert s.train.class_names == ("0-4", "5-9")
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert not set(s.train.ids) & set(s.val.ids) and not set(s.val.ids) & set(s.test.ids)
    assert _agree(s.train) == pytest.approx(0.99, abs=0.006)
    assert _agree(s.val) == pytest.approx(0.5, abs=0.01)
    assert _agree(s.test) == pytest.approx(0.5, abs=0.01)
    # every (class, colour) cell is present in train, the minority ones small
    counts = torch.bincount(s.train.cell_index(), minlength=4).tolist()
    assert min(counts) >= 1 and min(counts) < 0.02 * len(s.train)


def test_colored_digits_background_colour_is_the_group() -> None:
    s = load_splits(DatasetSpec(kind="colored-digits", image_size=8))
    corner = s.test.x[:, :, 0, 0]  # background pixel
    red = corner[:, 0] > corner[:, 1]
    assert torch.equal(red, s.test.g == 0)


def test_colored_digits_deterministic_by_seed() -> None:
    a = load_splits(DatasetSpec(kind="colored-digits", seed=3))
    b = load_splits(DatasetSpec(kind="colored-digits", seed=3))
    c = load_splits(DatasetSpec(kind="colored-digits", seed=4))
    assert torch.equal(a.train.x, b.train.x) and a.train.ids == b.train.ids
    assert torch.equal(a.val.g, b.val.g)
    assert a.train.ids != c.train.ids


def test_colored_digits_options() -> None:
    s = load_splits(
        DatasetSpec(kind="colored-digits", n_train=100, image_size=12, options={"p_train": 0.9})
    )
    assert len(s.train) == 100 and s.train.x.shape[-1] == 12
    assert _agree(s.train) == pytest.approx(0.9, abs=0.02)
    with pytest.raises(ConfigError, match="p_train"):
        load_splits(DatasetSpec(kind="colored-digits", options={"p_train": "high"}))


@pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed")
def test_colored_fmnist() -> None:
    spec = DatasetSpec(kind="colored-fmnist", n_train=3000, options={"n_val": 1000, "n_test": 1000})
    s = load_splits(spec)
    assert s.train.x.shape == (3000, 3, 28, 28)
    assert len(s.val) == 1000 and len(s.test) == 1000
    assert not set(s.val.ids) & set(s.test.ids)
    assert all(i.startswith("fmnist:t10k:") for i in s.val.ids)
    assert _agree(s.train) == pytest.approx(0.99, abs=0.003)
    assert _agree(s.val) == pytest.approx(0.5, abs=0.002)
    assert float(s.train.y.float().mean()) == pytest.approx(0.6, abs=0.03)  # 6 of 10 not tops


def test_colored_fmnist_missing_package(tmp_path: Path) -> None:
    with pytest.raises(DependencyMissingError, match="apt-get install dataset-fashion-mnist"):
        load_splits(DatasetSpec(kind="colored-fmnist", root=tmp_path))


def _write_images(root: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10, 7), (i * 40 % 256, 0, 0)).save(root / name)


def _csv(root: Path, lines: list[str]) -> Path:
    path = root / "labels.csv"
    path.write_text("\n".join(["path,label,place,split", *lines]) + "\n")
    return path


def test_image_csv_loads(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png", "b/c.png", "d.png", "e.png"])
    _csv(
        tmp_path,
        [
            "a.png,cat,land,train",
            "b/c.png,dog,water,train",
            "d.png,dog,land,val",
            "e.png,cat,water,test",
        ],
    )
    spec = DatasetSpec(kind="image-csv", root=tmp_path, group_columns=["place"], image_size=8)
    s = load_splits(spec)
    assert s.train.x.shape == (2, 3, 8, 8) and len(s.val) == 1 and len(s.test) == 1
    assert s.train.class_names == ("cat", "dog")
    assert s.train.group_names == ("place=land", "place=water")
    assert s.train.y.tolist() == [0, 1] and s.train.g.tolist() == [0, 1]
    assert s.test.g.tolist() == [1] and s.train.has_groups


def test_image_csv_without_groups_and_int_labels(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "labels.csv").write_text("path,label,split\na.png,0,train\nb.png,2,0\n")
    s = load_splits(DatasetSpec(kind="image-csv", root=tmp_path, image_size=8))
    assert s.train.class_names == ("0", "1", "2") and s.train.y.tolist() == [0, 2]
    assert s.train.g.tolist() == [-1, -1] and not s.train.has_groups and len(s.val) == 0


def test_image_csv_missing_file_names_the_row(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png"])
    _csv(tmp_path, ["a.png,cat,land,train", "gone.png,dog,land,train"])
    with pytest.raises(DatasetError, match=r"line 3: image file .*gone.png does not exist"):
        load_splits(DatasetSpec(kind="image-csv", root=tmp_path, group_columns=["place"]))


def test_image_csv_unknown_label_names_the_row(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png", "b.png"])
    _csv(tmp_path, ["a.png,cat,land,train", "b.png,horse,land,train"])
    spec = DatasetSpec(kind="image-csv", root=tmp_path, class_names=["cat", "dog"])
    with pytest.raises(DatasetError, match=r"line 3: label 'horse' is not a known class"):
        load_splits(spec)


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/hostname", "link.png"])
def test_image_csv_refuses_paths_outside_root(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "data"
    _write_images(tmp_path, ["outside.png"])
    _write_images(root, ["a.png"])
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    _csv(root, ["a.png,cat,land,train", f"{bad},cat,land,train"])
    with pytest.raises(DatasetError, match="outside the dataset root"):
        load_splits(DatasetSpec(kind="image-csv", root=root))


def test_image_csv_bad_split_and_missing_column(tmp_path: Path) -> None:
    _write_images(tmp_path, ["a.png"])
    _csv(tmp_path, ["a.png,cat,land,holdout"])
    with pytest.raises(DatasetError, match="line 2: split 'holdout'"):
        load_splits(DatasetSpec(kind="image-csv", root=tmp_path))
    with pytest.raises(DatasetError, match=r"missing columns \['site'\]"):
        load_splits(DatasetSpec(kind="image-csv", root=tmp_path, group_columns=["site"]))
    with pytest.raises(ConfigError, match="needs `root`"):
        load_splits(DatasetSpec(kind="image-csv"))


def test_wilds_metadata_waterbirds_layout(tmp_path: Path) -> None:
    names = [f"001.Bird/{i}.jpg" for i in range(5)]
    _write_images(tmp_path, names)
    rows = [f"{i},{n},{i % 2},{i % 3},{1 - i % 2},places/x.jpg" for i, n in enumerate(names)]
    (tmp_path / "metadata.csv").write_text(
        "img_id,img_filename,y,split,place,place_filename\n" + "\n".join(rows) + "\n"
    )
    s = load_splits(DatasetSpec(kind="wilds-metadata", root=tmp_path, image_size=8))
    assert len(s.train) == 2 and len(s.val) == 2 and len(s.test) == 1
    assert s.train.group_names == ("place=0", "place=1")
    assert s.train.class_names == ("0", "1")
    assert np.array_equal(s.train.y.numpy(), [0, 1]) and s.train.g.tolist() == [1, 0]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=64))
def test_idx_reader_never_crashes_on_garbage(tmp_path: Path, raw: bytes) -> None:
    from patchd.plugins.datasets.colored_fmnist import read_idx

    path = tmp_path / "x.idx"
    path.write_bytes(raw)
    try:
        arr = read_idx(path)
    except StageError:
        return
    assert arr.size * arr.dtype.itemsize == len(raw) - 4 - 4 * raw[3]


def test_idx_reader_roundtrip(tmp_path: Path) -> None:
    import gzip

    from patchd.plugins.datasets.colored_fmnist import read_idx

    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    with gzip.open(tmp_path / "a.gz", "wb") as fh:
        fh.write(header + data.tobytes())
    assert np.array_equal(read_idx(tmp_path / "a.gz"), data)


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=st.sampled_from('ab,.\n"/01x '), max_size=80))
def test_csv_table_parser_only_raises_dataset_errors(tmp_path: Path, text: str) -> None:
    from patchd.plugins.datasets.image_csv import Columns, read_rows

    path = tmp_path / "t.csv"
    path.write_text("path,label,split\n" + text)
    try:
        rows = read_rows(path, Columns(), [])
    except DatasetError:
        return
    assert all(r.split in (0, 1, 2) and r.line >= 2 for r in rows)


@pytest.mark.parametrize(
    "raw",
    [b"", bytes([0, 0, 8, 3, 0]), bytes([1, 0, 8, 1]), bytes([0, 0, 8, 1, 0, 0, 0, 5, 1])],
)
def test_idx_reader_rejects_truncated_files(tmp_path: Path, raw: bytes) -> None:
    from patchd.plugins.datasets.colored_fmnist import read_idx

    (tmp_path / "x").write_bytes(raw)
    with pytest.raises(StageError, match="IDX"):
        read_idx(tmp_path / "x")

"""``image-csv``: an image folder plus a CSV ``path,label,<group attributes>,split``.

- ``spec.root``: the image folder; ``spec.csv``: the table (default ``<root>/labels.csv``).
- ``path``: relative to ``root``; a path that resolves outside ``root`` (``..``, absolute paths,
  symlinks out) is refused. A missing or unreadable file is an error naming the CSV row.
- ``label``: a class name from ``spec.class_names`` or a class index; without ``class_names``,
  integer labels 0..K-1 or the sorted distinct strings. An unknown label names the row.
- ``split``: ``train`` / ``val`` (``valid``, ``validation``) / ``test`` or 0 / 1 / 2.
- ``spec.group_columns``: attributes defining subgroups; the group name joins ``col=value`` with
  commas, columns sorted by name whatever their order in the config (``place=water,sex=f``:
  :func:`patchd.ml.data.group_name`, the naming production events get too). Without group
  columns the groups are unknown (-1) and the miner forms pseudo-subgroups.
Images are converted to RGB and resized to ``image_size`` (default 64) squares.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from patchd.config import DatasetSpec
from patchd.exceptions import ConfigError, DatasetError
from patchd.ml.data import UNKNOWN_GROUP, ImageSet, Splits, group_name
from patchd.ml.datasets import image_size

SPLIT_NAMES = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2, "0": 0, "1": 1, "2": 2}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Row:
    line: int  # line number in the CSV (header = 1)
    path: str
    label: str
    group: str | None  # "col=value,..." or None when no group columns
    split: int


@dataclass(frozen=True)
class Columns:
    """Which CSV columns hold what (image-csv and wilds-metadata differ only here)."""

    path: str = "path"
    label: str = "label"
    split: str = "split"


def read_rows(csv_path: Path, columns: Columns, group_columns: Sequence[str]) -> list[Row]:
    """Parse the table into rows; DatasetError naming the file, line and column on bad input."""
    try:
        with csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            _check_header(csv_path, header, columns, group_columns)
            return [
                _row(csv_path, i + 2, rec, columns, group_columns) for i, rec in enumerate(reader)
            ]
    except OSError as err:
        raise DatasetError(f"cannot read dataset table {csv_path}: {err.strerror}") from err
    except csv.Error as err:
        raise DatasetError(f"{csv_path} is not valid CSV: {err}") from err


def _check_header(
    csv_path: Path, header: Sequence[str], columns: Columns, group_columns: Sequence[str]
) -> None:
    needed = [columns.path, columns.label, columns.split, *group_columns]
    missing = [c for c in needed if c not in header]
    if missing:
        raise DatasetError(f"{csv_path}: missing columns {missing}; the header is {list(header)}")


def _row(
    csv_path: Path, line: int, rec: dict[str, str], columns: Columns, group_columns: Sequence[str]
) -> Row:
    split = SPLIT_NAMES.get((rec.get(columns.split) or "").strip().lower())
    if split is None:
        raise DatasetError(
            f"{csv_path} line {line}: split {rec.get(columns.split)!r} is not one of "
            "train/val/test or 0/1/2"
        )
    group = group_name({c: (rec.get(c) or "").strip() for c in group_columns})
    return Row(
        line=line,
        path=(rec.get(columns.path) or "").strip(),
        label=(rec.get(columns.label) or "").strip(),
        group=group,
        split=split,
    )


def class_names_for(rows: Sequence[Row], given: Sequence[str] | None) -> tuple[str, ...]:
    if given:
        return tuple(given)
    labels = sorted({r.label for r in rows})
    if labels and all(lab.isdigit() for lab in labels):
        return tuple(str(i) for i in range(max(int(lab) for lab in labels) + 1))
    return tuple(labels)


def label_index(row: Row, class_names: Sequence[str], csv_path: Path) -> int:
    if row.label in class_names:
        return class_names.index(row.label)
    if row.label.isdigit() and int(row.label) < len(class_names):
        return int(row.label)
    raise DatasetError(
        f"{csv_path} line {row.line}: label {row.label!r} is not a known class "
        f"{list(class_names)} (set data.*.class_names or fix the row)"
    )


def resolve_image(root: Path, row: Row, csv_path: Path) -> Path:
    """The row's image path, resolved (symlinks too) and required to lie inside ``root``."""
    if not row.path:
        raise DatasetError(f"{csv_path} line {row.line}: empty image path")
    base = root.resolve()
    path = (base / row.path).resolve()
    if not path.is_relative_to(base):
        raise DatasetError(
            f"{csv_path} line {row.line}: image path {row.path!r} resolves outside the dataset "
            f"root {base}; paths must stay inside the root"
        )
    if not path.is_file():
        raise DatasetError(f"{csv_path} line {row.line}: image file {path} does not exist")
    return path


def read_image(path: Path, size: int, line: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"line {line}: cannot read image {path}: {err}") from err
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def build_splits(rows: Sequence[Row], root: Path, csv_path: Path, spec: DatasetSpec) -> Splits:
    """Validate every row first (paths, labels), then load the images into three ImageSets."""
    if not rows:
        raise DatasetError(f"{csv_path} has no data rows")
    classes = class_names_for(rows, spec.class_names)
    labels = [label_index(r, classes, csv_path) for r in rows]
    paths = [resolve_image(root, r, csv_path) for r in rows]
    group_names = tuple(sorted({r.group for r in rows if r.group is not None}))
    size = image_size(spec)
    sets = []
    for split_no, split in enumerate(SPLITS):
        idx = [i for i, r in enumerate(rows) if r.split == split_no]
        if split_no == 0 and spec.n_train is not None:
            idx = idx[: spec.n_train]
        sets.append(_image_set(rows, idx, paths, labels, classes, group_names, size, split))
    return Splits(train=sets[0], val=sets[1], test=sets[2])


def _image_set(
    rows: Sequence[Row],
    idx: Sequence[int],
    paths: Sequence[Path],
    labels: Sequence[int],
    classes: tuple[str, ...],
    group_names: tuple[str, ...],
    size: int,
    split: str,
) -> ImageSet:
    images = [read_image(paths[i], size, rows[i].line) for i in idx]
    x = torch.stack(images) if images else torch.zeros((0, 3, size, size))
    groups = [group_names.index(rows[i].group) if rows[i].group else UNKNOWN_GROUP for i in idx]
    return ImageSet(
        x=x,
        y=torch.tensor([labels[i] for i in idx], dtype=torch.int64),
        g=torch.tensor(groups, dtype=torch.int64),
        class_names=classes,
        group_names=group_names,
        ids=tuple(f"{split}:{rows[i].path}" for i in idx),
    )


def load(spec: DatasetSpec) -> Splits:
    if spec.root is None:
        raise ConfigError("data kind image-csv needs `root` (the image folder)")
    root = Path(spec.root)
    csv_path = Path(spec.csv) if spec.csv is not None else root / "labels.csv"
    rows = read_rows(csv_path, Columns(), spec.group_columns)
    return build_splits(rows, root, csv_path, spec)

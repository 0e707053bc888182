"""``wilds-metadata``: a WILDS-style ``metadata.csv`` (Waterbirds / CelebA layout).

Columns ``img_filename`` (relative to ``spec.root``), ``y`` (class index), ``split`` (0 train,
1 val, 2 test) and the subgroup attributes named in ``spec.group_columns`` (default ``place``
when the table has it, as in Waterbirds). The table is ``spec.csv`` or ``<root>/metadata.csv``.
Containment, missing files and unknown labels are checked exactly as for ``image-csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from patchd.config import DatasetSpec
from patchd.exceptions import ConfigError, DatasetError
from patchd.ml.data import Splits
from patchd.plugins.datasets.image_csv import Columns, build_splits, read_rows

COLUMNS = Columns(path="img_filename", label="y", split="split")
DEFAULT_GROUP_COLUMNS = ("place",)


def _group_columns(csv_path: Path, spec: DatasetSpec) -> list[str]:
    if spec.group_columns:
        return list(spec.group_columns)
    try:
        with csv_path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
    except OSError as err:
        raise DatasetError(f"cannot read dataset table {csv_path}: {err.strerror}") from err
    return [c for c in DEFAULT_GROUP_COLUMNS if c in header]


def load(spec: DatasetSpec) -> Splits:
    if spec.root is None:
        raise ConfigError("data kind wilds-metadata needs `root` (the dataset folder)")
    root = Path(spec.root)
    csv_path = Path(spec.csv) if spec.csv is not None else root / "metadata.csv"
    rows = read_rows(csv_path, COLUMNS, _group_columns(csv_path, spec))
    return build_splits(rows, root, csv_path, spec)

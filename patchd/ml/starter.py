"""Checks behind ``patchd init``: does a user's dataset table and model fit patchd?

- :func:`inspect_table` reads an ``image-csv`` or ``wilds-metadata`` table: its columns, the
  group columns to use (given, or the extra columns with few distinct values), the class names,
  rows per split and per (class, group) cell, and that every image path stays inside the root
  and exists.
- :func:`check_model` builds the model from its factory (with the input normalization patchd
  would apply), loads the safetensors weights strictly, runs it on a batch of the data and checks
  that it returns one score per class.

Every problem is a :class:`~patchd.exceptions.DatasetError` or
:class:`~patchd.exceptions.PluginError` naming the file, row, field or shape that is wrong.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchd.config import InputNormalization, ModelConfig
from patchd.exceptions import DatasetError, PatchdError, PluginError
from patchd.plugins.datasets import image_csv, wilds_metadata
from patchd.plugins.datasets.image_csv import SPLITS, Columns, Row

MAX_GROUP_VALUES = 16  # an extra column with more distinct values is not taken as a group


@dataclass(frozen=True)
class TableSummary:
    """What :func:`inspect_table` found in a dataset table."""

    kind: str
    root: Path
    csv: Path
    columns: tuple[str, ...]
    group_columns: tuple[str, ...]
    skipped_columns: tuple[str, ...]  # extra columns not taken as groups (too many values)
    class_names: tuple[str, ...]
    split_counts: dict[str, int]
    cell_counts: dict[str, dict[str, int]]  # split -> "class|group" -> rows
    rows: tuple[Row, ...]

    def batch(self, split: str, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[n, 3, size, size]`` in [0, 1] and labels of the first ``n`` rows of a split."""
        number = SPLITS.index(split)
        picked = [r for r in self.rows if r.split == number][:n]
        images = [
            image_csv.read_image(image_csv.resolve_image(self.root, r, self.csv), size, r.line)
            for r in picked
        ]
        labels = [image_csv.label_index(r, self.class_names, self.csv) for r in picked]
        x = torch.stack(images) if images else torch.zeros((0, 3, size, size))
        return x, torch.tensor(labels, dtype=torch.int64)


def columns_of(kind: str) -> Columns:
    return wilds_metadata.COLUMNS if kind == "wilds-metadata" else Columns()


def default_table(kind: str, root: Path) -> Path:
    return root / ("metadata.csv" if kind == "wilds-metadata" else "labels.csv")


def _read_table(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with csv_path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            records = list(reader)
            return list(reader.fieldnames or []), records
    except OSError as err:
        raise DatasetError(f"cannot read dataset table {csv_path}: {err.strerror}") from err
    except csv.Error as err:
        raise DatasetError(f"{csv_path} is not valid CSV: {err}") from err


def guess_group_columns(
    kind: str, header: Sequence[str], records: Sequence[dict[str, str]]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(group columns, skipped extra columns) when none were given.

    ``wilds-metadata``: ``place`` when present (the loader's own default). ``image-csv``: every
    column besides path/label/split with at most :data:`MAX_GROUP_VALUES` distinct values
    (ids, file names and free text have more), sorted by name.
    """
    if kind == "wilds-metadata":
        found = tuple(c for c in wilds_metadata.DEFAULT_GROUP_COLUMNS if c in header)
        return found, ()
    fixed = set(Columns().__dict__.values())
    extra = [c for c in header if c not in fixed]
    few = [c for c in extra if len({(r.get(c) or "").strip() for r in records}) <= MAX_GROUP_VALUES]
    return tuple(sorted(few)), tuple(c for c in extra if c not in few)


def inspect_table(
    kind: str,
    root: Path,
    csv_path: Path | None = None,
    group_columns: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> TableSummary:
    """Read and check a dataset table (every row's label and image path); see the module doc."""
    table = csv_path or default_table(kind, root)
    header, records = _read_table(table)
    skipped: tuple[str, ...] = ()
    if group_columns is None:
        groups, skipped = guess_group_columns(kind, header, records)
    else:
        groups = tuple(group_columns)
    rows = image_csv.read_rows(table, columns_of(kind), groups)
    if not rows:
        raise DatasetError(f"{table} has no data rows")
    classes = image_csv.class_names_for(rows, class_names)
    if len(classes) < 2:
        raise DatasetError(
            f"{table}: found {len(classes)} class ({list(classes)}); need two or more"
        )
    counts: dict[str, Counter[str]] = {s: Counter() for s in SPLITS}
    for r in rows:
        cls = classes[image_csv.label_index(r, classes, table)]
        image_csv.resolve_image(root, r, table)
        counts[SPLITS[r.split]][f"{cls}|{r.group or 'all'}"] += 1
    return TableSummary(
        kind=kind,
        root=root,
        csv=table,
        columns=tuple(header),
        group_columns=groups,
        skipped_columns=skipped,
        class_names=tuple(classes),
        split_counts={s: sum(c.values()) for s, c in counts.items()},
        cell_counts={s: dict(sorted(c.items())) for s, c in counts.items()},
        rows=tuple(rows),
    )


def require_splits(summary: TableSummary) -> list[str]:
    """DatasetError when train or test is empty; warnings (strings) for a missing val split."""
    for split, why in (("train", "patches train on it"), ("test", "the gate judges on it")):
        if summary.split_counts[split] == 0:
            raise DatasetError(
                f"{summary.csv} has no rows with split={split}; patchd needs one ({why}); "
                "the split column takes train/val/test or 0/1/2"
            )
    if summary.split_counts["val"] == 0:
        return [
            "no rows with split=val: trainers choose their epoch and miners fit on validation data"
        ]
    return []


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model` measured on one batch."""

    n_parameters: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    batch_accuracy: float  # on the checked batch: near chance hints at a preprocessing mismatch


def check_model(
    factory: str,
    factory_kwargs: dict[str, Any],
    weights: Path,
    normalization: InputNormalization | None,
    batch: tuple[torch.Tensor, torch.Tensor],
    class_names: Sequence[str],
) -> ModelCheck:
    """Build, load, run on ``batch``; PluginError naming what does not fit."""
    from patchd.ml.models import build_model, load_weights

    if weights.suffix != ".safetensors":
        raise PluginError(
            f"{weights} is not a .safetensors file; patchd loads safetensors only "
            "(convert with safetensors.torch.save_file(model.state_dict(), path))"
        )
    config = ModelConfig(
        factory=factory,
        factory_kwargs=factory_kwargs,
        class_names=list(class_names),
        input_normalization=normalization,
    )
    model = build_model(config)
    try:
        load_weights(model, weights)
    except PatchdError as err:
        raise PluginError(str(err)) from err
    x, y = batch
    logits = _forward(model, x, factory)
    if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
        raise PluginError(
            f"model {factory!r} returned shape {tuple(logits.shape)} for an input of shape "
            f"{tuple(x.shape)}; patchd needs logits [N, {len(class_names)}] (one row per image)"
        )
    if logits.shape[1] != len(class_names):
        raise PluginError(
            f"model {factory!r} has {logits.shape[1]} outputs but the data has "
            f"{len(class_names)} classes {list(class_names)}; set model.factory_kwargs "
            "(e.g. num_classes) or model.class_names to match the weights"
        )
    if not torch.isfinite(logits).all():
        raise PluginError(f"model {factory!r} returned NaN or infinite logits on the batch")
    correct = (logits.argmax(1) == y).float().mean().item() if len(y) else float("nan")
    return ModelCheck(
        n_parameters=sum(p.numel() for p in model.parameters()),
        input_shape=tuple(x.shape),
        output_shape=tuple(logits.shape),
        batch_accuracy=correct,
    )


def _forward(model: torch.nn.Module, x: torch.Tensor, factory: str) -> torch.Tensor:
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except PatchdError:
        raise
    except Exception as err:
        raise PluginError(
            f"model {factory!r} failed on a batch of shape {tuple(x.shape)} (RGB floats in "
            f"[0, 1], resized to the data's image_size): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(out, torch.Tensor):
        raise PluginError(
            f"model {factory!r} returned {type(out).__name__}; patchd needs a logits tensor"
        )
    return out

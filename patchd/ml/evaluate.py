"""Evaluate torch models into the numpy report types of :mod:`patchd.evaluation`."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from patchd.evaluation import ModelEvaluation, PairedEvaluation, cell_mix, evaluate_correct, paired
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.models import DEFAULT_BATCH, predict

log = logging.getLogger(__name__)


def n_cells(data: ImageSet) -> int:
    return data.num_classes * max(1, len(data.group_names))


def train_mix_of(train: ImageSet | np.ndarray | None, data: ImageSet) -> np.ndarray:
    """Cell shares of the training set (an ImageSet with the same groups, or given shares)."""
    cells = n_cells(data)
    if train is None:
        return cell_mix(data.cell_index().numpy(), cells)
    if isinstance(train, ImageSet):
        if train.group_names != data.group_names or train.class_names != data.class_names:
            log.warning(
                "training set groups %s differ from the evaluation groups %s; "
                "reweighting to the evaluation mix instead",
                train.group_names,
                data.group_names,
            )
            return cell_mix(data.cell_index().numpy(), cells)
        return cell_mix(train.cell_index().numpy(), cells)
    mix = np.asarray(train, dtype=float)
    if mix.shape != (cells,):
        raise StageError(f"train_mix has shape {mix.shape}, expected ({cells},) cell shares")
    return mix


def correct_of(model: nn.Module, data: ImageSet, batch_size: int = DEFAULT_BATCH) -> np.ndarray:
    """Per-example correctness (bool numpy array)."""
    probs = predict(model, data.x, batch_size)
    return (probs.argmax(1) == data.y).numpy() if len(data) else np.zeros(0, bool)


def _require_data(data: ImageSet) -> None:
    if len(data) == 0:
        raise StageError("the held-out evaluation set is empty (0 examples)")


def evaluate_model(
    model: nn.Module,
    data: ImageSet,
    train_mix: ImageSet | np.ndarray | None = None,
    confidence: float = 0.95,
    n_min: int = 1,
) -> ModelEvaluation:
    _require_data(data)
    return evaluate_correct(
        correct_of(model, data),
        data.cell_index().numpy(),
        data.class_names,
        data.group_names,
        train_mix_of(train_mix, data),
        confidence=confidence,
        n_min=n_min,
    )


def evaluate_pair(
    incumbent: nn.Module,
    candidate: nn.Module,
    data: ImageSet,
    train_mix: ImageSet | np.ndarray | None = None,
    confidence: float = 0.95,
    n_min: int = 1,
) -> PairedEvaluation:
    """Incumbent and candidate on the same held-out examples, with per-example arrays."""
    _require_data(data)
    with torch.no_grad():
        inc, cand = correct_of(incumbent, data), correct_of(candidate, data)
    return paired(
        inc,
        cand,
        data.cell_index().numpy(),
        data.class_names,
        data.group_names,
        train_mix_of(train_mix, data),
        confidence=confidence,
        n_min=n_min,
        ids=data.ids,
    )

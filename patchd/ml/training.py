"""Plain supervised training shared by the ERM trainer, the baselines and the demo.

:func:`fit` trains ``model`` in place with Adam and (optionally per-example weighted) cross
entropy, shuffling with a seeded generator so a run is repeatable on the same device.
:func:`patchd.ml.evaluate.evaluate_model` evaluates a model per (class, subgroup) cell.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from patchd.abc import TrainResult
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _check_inputs(model: nn.Module, data: ImageSet, sample_weights: torch.Tensor | None) -> None:
    if len(data) == 0:
        raise StageError("cannot train on an empty dataset (0 examples)")
    if sample_weights is not None and sample_weights.shape != (len(data),):
        raise StageError(
            f"sample_weights has shape {tuple(sample_weights.shape)}, expected ({len(data)},)"
        )
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if head and head[-1].out_features < data.num_classes:
        raise StageError(
            f"model has {head[-1].out_features} outputs but the data has {data.num_classes} classes"
        )


def fit(
    model: nn.Module,
    data: ImageSet,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    sample_weights: torch.Tensor | None = None,
    seed: int = 0,
    weight_decay: float = 0.0,
) -> TrainResult:
    """Train ``model`` in place; returns it with per-epoch loss/accuracy history."""
    _check_inputs(model, data, sample_weights)
    device = torch.device(device)
    model.to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    weights = sample_weights.float() if sample_weights is not None else None
    history: list[dict[str, float]] = []
    start = time.monotonic()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        stats = _epoch(model, data, order, batch_size, optimizer, device, weights)
        history.append({"epoch": float(epoch + 1), **stats})
        log.debug("epoch %d/%d loss=%.4f acc=%.4f", epoch + 1, epochs, stats["loss"], stats["acc"])
        if progress is not None:
            progress((epoch + 1) / epochs, f"epoch {epoch + 1}/{epochs} loss {stats['loss']:.3f}")
    model.eval()
    return TrainResult(
        model=model, epochs=epochs, seconds=time.monotonic() - start, history=tuple(history)
    )


def _epoch(
    model: nn.Module,
    data: ImageSet,
    order: torch.Tensor,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    weights: torch.Tensor | None,
) -> dict[str, float]:
    model.train()
    total_loss, total_correct = 0.0, 0
    for idx in torch.split(order, max(1, batch_size)):
        x, y = data.x[idx].to(device), data.y[idx].to(device)
        logits = model(x)
        losses = nn.functional.cross_entropy(logits, y, reduction="none")
        if weights is None:
            loss = losses.mean()
        else:
            w = weights[idx].to(device)
            loss = (w * losses).sum() / w.sum().clamp_min(1e-12)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(losses.detach().sum())
        total_correct += int((logits.argmax(1) == y).sum())
    return {"loss": total_loss / len(order), "acc": total_correct / len(order)}

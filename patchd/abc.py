"""Interfaces of patchd's pluggable parts.

The parts of ``patchd serve`` itself implement :class:`patchd.services.Component`.

- :class:`Miner`, :class:`Augmenter`, :class:`Trainer`: the ML stages that run in workers.
  Implementations live in ``patchd.plugins.<kind>s`` and are registered in
  :mod:`patchd.plugins.catalog` (name -> class); a ``module:Class`` path selects a third-party one.

Torch types appear only as strings so importing this module stays light.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from patchd.config import PatchConfig
    from patchd.ml.data import ImageSet
    from patchd.monitor.mined import MinedGroups


@dataclass
class StageContext:
    """What an ML stage gets from the worker: where to write, which device, budgets, progress."""

    run_id: str
    stage: str
    out_dir: Path  # the stage's temp dir; renamed into place when the stage succeeds
    params: PatchConfig
    device: str = "cpu"
    seed: int = 0
    progress: Callable[[float, str], None] = lambda fraction, message: None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("patchd.stage"))

    def plugin_params(self, name: str) -> dict[str, Any]:
        return dict(self.params.params.get(name, {}))


@dataclass(frozen=True)
class FailureMode:
    """One class's failure direction."""

    cls: int
    direction: list[float]  # unit vector in the embedding space
    strength: float  # 2-fold CV balanced accuracy of the correct-vs-wrong SVM
    description: str  # caption or over-represented group attributes
    n_wrong: int
    n_total: int
    # subgroup miner: confidence of the mined group and its size on the scored split
    confidence: float | None = None
    n_members: int | None = None
    status: str = "mined"  # or why no subgroup was mined for this class


@dataclass(frozen=True)
class MiningResult:
    modes: tuple[FailureMode, ...]
    # per training example: the subgroup assignment used downstream (true groups when known,
    # otherwise the mined hard(1)/easy(0) side within each class)
    groups: torch.Tensor
    group_names: tuple[str, ...]
    hardness: torch.Tensor  # signed score per training example, > 0 on the hard/member side
    mined: bool  # True when groups come from the miner, False when true attributes were used
    report_json: Path | None = None
    report_png: Path | None = None
    # per training example: probability of belonging to its class's failing subgroup (None when
    # the miner has no calibrated membership, e.g. ``svm``)
    membership: torch.Tensor | None = None
    # the per-class membership models in the incumbent's embedding space, for the monitor's
    # ``mined`` pseudo-groups (None when the miner has none, or embedded with another encoder);
    # model, run id and incumbent digest are filled in by the mine stage
    pseudo_groups: MinedGroups | None = None


@dataclass(frozen=True)
class Augmentation:
    """What an augmenter produced for the trainer."""

    kind: str
    # aligned with the training set: name -> tensor [N,C,H,W] (CycleGAN: "F" and "G" translations)
    paired: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: ImageSet | None = None  # newly synthesized labeled samples
    previews: tuple[Path, ...] = ()  # PNGs a person looks at
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainResult:
    model: torch.nn.Module
    epochs: int
    seconds: float
    history: tuple[dict[str, float], ...] = ()


class Miner(ABC):
    """Finds the failure directions of a model on data and assigns (pseudo-)subgroups."""

    @abstractmethod
    def mine(
        self,
        ctx: StageContext,
        model: torch.nn.Module,
        data: ImageSet,
        fit_data: ImageSet | None = None,
    ) -> MiningResult:
        """Assign groups to ``data`` (the training split); fit on ``fit_data`` when given (the
        held-out labeled data: validation + labeled production events), else on ``data``."""


class Augmenter(ABC):
    """Synthesizes targeted data. Deterministic given ``ctx.seed``; never mutates its inputs."""

    @abstractmethod
    def synthesize(
        self, ctx: StageContext, model: torch.nn.Module, train: ImageSet
    ) -> Augmentation: ...


class Trainer(ABC):
    """Retrains (usually fine-tunes) ``model``; returns a new module, never mutates the input."""

    @abstractmethod
    def train(
        self,
        ctx: StageContext,
        model: torch.nn.Module,
        train: ImageSet,
        val: ImageSet,
        augmentation: Augmentation | None,
    ) -> TrainResult: ...

"""What the robust trainers share: device and seeds, group-balanced sampling, the epoch loop with
model selection on the validation split, per-cell accuracy, and the trainer skeleton
(:class:`FineTuneTrainer`, :class:`EpochTrainer`) that gdro, camel, defuse and dfr fill in.

Every trainer here fine-tunes a deep copy of the incumbent (the input module is never mutated),
runs on CUDA when present, reads its budget from ``ctx.params.budget`` (epochs, batch_size, lr,
max_minutes) and keeps the epoch whose validation worst-group accuracy is best (average
accuracy when the validation split has no subgroup labels), Sagawa's ``--save_best`` rule.
"""

from __future__ import annotations

import copy
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from patchd.abc import Augmentation, StageContext, Trainer, TrainResult
from patchd.exceptions import StageError
from patchd.ml.data import ImageSet
from patchd.ml.training import seed_everything


def pick_device(ctx: StageContext) -> torch.device:
    """CUDA when present, else what the worker asked for (``ctx.device``, normally ``cpu``)."""
    return torch.device("cuda" if torch.cuda.is_available() else ctx.device)


def clone_to(model: nn.Module, device: torch.device) -> nn.Module:
    """A trainable deep copy of ``model`` on ``device``; the incumbent is never touched."""
    twin = copy.deepcopy(model).to(device)
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


def cells_of(data: ImageSet, groups_per_class: int) -> torch.Tensor:
    """Cell id per example, ``y * groups_per_class + g`` (unknown groups count as group 0)."""
    return data.y * groups_per_class + data.g.clamp(min=0)


def cell_counts(data: ImageSet, groups_per_class: int) -> torch.Tensor:
    """Training count per (class, group) cell, shape ``[classes, groups_per_class]``."""
    cells = cells_of(data, groups_per_class)
    n = data.num_classes * groups_per_class
    return torch.bincount(cells, minlength=n)[:n].view(data.num_classes, groups_per_class)


class BalancedSampler:
    """Draws group-balanced index batches: ``batch // cells`` rows per non-empty cell, with
    replacement (CAMEL's per-group infinite iterators; Sagawa's ``--reweight_groups``)."""

    def __init__(self, cells: torch.Tensor, batch_size: int, generator: torch.Generator) -> None:
        self.members = [
            (cells == c).nonzero(as_tuple=True)[0] for c in torch.unique(cells).tolist()
        ]
        self.per_cell = max(1, batch_size // len(self.members))
        self.generator = generator

    def __call__(self) -> torch.Tensor:
        picks = [
            m[torch.randint(len(m), (self.per_cell,), generator=self.generator)]
            for m in self.members
        ]
        return torch.cat(picks)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Predicted class per row, evaluated in eval mode on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(x[i : i + batch].to(device)).argmax(dim=1).cpu() for i in range(0, len(x), batch)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class GroupScore:
    """Accuracy per (class, group) cell, the worst cell and the pooled average."""

    worst: float
    average: float
    cells: dict[str, float] = field(default_factory=dict)


def group_scores(model: nn.Module, data: ImageSet) -> GroupScore:
    """Per-cell accuracy of ``model`` on ``data`` (cells with at least one example)."""
    correct = (predict(model, data.x) == data.y).to(torch.float32)
    average = float(correct.mean()) if len(correct) else 0.0
    if not data.has_groups:
        return GroupScore(worst=average, average=average)
    scores: dict[str, float] = {}
    for y in torch.unique(data.y).tolist():
        for g in torch.unique(data.g[data.y == y]).tolist():
            mask = (data.y == y) & (data.g == g)
            scores[f"{data.class_names[y]}|{data.group_names[g]}"] = float(correct[mask].mean())
    return GroupScore(worst=min(scores.values()), average=average, cells=scores)


@dataclass(frozen=True)
class Budget:
    epochs: int
    batch_size: int
    lr: float
    max_seconds: float

    @classmethod
    def from_ctx(cls, ctx: StageContext, params: dict[str, Any]) -> Budget:
        """``params``: patch.params.<trainer> (YAML values, converted here)."""
        b = ctx.params.budget
        return cls(
            epochs=int(params.get("epochs", b.epochs)),
            batch_size=int(params.get("batch_size", b.batch_size)),
            lr=float(params.get("lr", b.lr)),
            max_seconds=float(b.max_minutes) * 60.0,
        )


class Start(NamedTuple):
    """What a fine-tuning trainer begins with (see :func:`start`)."""

    params: dict[str, Any]  # patch.params.<trainer>
    gen: torch.Generator  # seeded from ctx.seed
    device: torch.device
    net: nn.Module  # a trainable copy of the incumbent on ``device``
    budget: Budget


def start(ctx: StageContext, model: nn.Module, trainer: str) -> Start:
    """Seed everything from ``ctx.seed``, copy ``model`` to the device, read params and budget."""
    params: dict[str, Any] = ctx.plugin_params(trainer)
    gen = seed_everything(ctx.seed)
    device = pick_device(ctx)
    return Start(params, gen, device, clone_to(model, device), Budget.from_ctx(ctx, params))


def make_optimizer(model: nn.Module, params: dict[str, object], lr: float) -> torch.optim.Optimizer:
    """Adam (default) or SGD-Nesterov 0.9 (``optimizer: sgd``, CAMEL's), weight decay on all."""
    wd = float(params.get("weight_decay", 5e-4))  # type: ignore[arg-type]
    if params.get("optimizer", "adam") == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd
        )
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)


StepOut = tuple[torch.Tensor, dict[str, float]]  # one step's loss and its metrics
StepFn = Callable[[], StepOut]


def step_out(loss: torch.Tensor, **parts: torch.Tensor) -> StepOut:
    """``loss`` with the metrics of a step: ``loss`` and each named part, as floats."""
    return loss, {"loss": float(loss.detach())} | {k: float(v.detach()) for k, v in parts.items()}


def run_epochs(
    ctx: StageContext,
    model: nn.Module,
    val: ImageSet,
    step: StepFn,
    steps_per_epoch: int,
    budget: Budget,
    optimizer: torch.optim.Optimizer,
    keep_best: bool = True,
) -> TrainResult:
    """The shared loop: ``step()`` returns (loss, metrics); keeps the best epoch on ``val``
    (the last epoch when ``keep_best`` is False)."""
    start = time.monotonic()
    best = group_scores(model, val)
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, float]] = [
        {"epoch": 0.0, "val_worst": best.worst, "val_avg": best.average}
    ]
    epochs_done = 0
    for epoch in range(1, budget.epochs + 1):
        model.train()
        sums: dict[str, float] = {}
        for _ in range(steps_per_epoch):
            loss, metrics = step()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / steps_per_epoch
        epochs_done = epoch
        score = group_scores(model, val)
        history.append(
            {"epoch": float(epoch), "val_worst": score.worst, "val_avg": score.average, **sums}
        )
        if not keep_best or (score.worst, score.average) > (best.worst, best.average):
            best, best_state = score, copy.deepcopy(model.state_dict())
        ctx.progress(epoch / budget.epochs, f"epoch {epoch}: val worst {score.worst:.3f}")
        ctx.log.info(
            "run %s epoch %d val worst %.3f avg %.3f", ctx.run_id, epoch, score.worst, score.average
        )
        if time.monotonic() - start > budget.max_seconds:
            ctx.log.warning("run %s: time budget spent after epoch %d", ctx.run_id, epoch)
            break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        model=model, epochs=epochs_done, seconds=time.monotonic() - start, history=tuple(history)
    )


def groups_per_class(data: ImageSet) -> int:
    return max(1, len(data.group_names))


def require_groups(train: ImageSet, trainer: str) -> None:
    if not train.has_groups:
        raise StageError(
            f"the {trainer} trainer needs a subgroup per training example but some are unknown "
            "(g = -1); run a miner first (patch.miner: svm) or give the data group attributes"
        )


@dataclass(frozen=True)
class Job:
    """The inputs of one :meth:`FineTuneTrainer.train` call, as the hooks see them."""

    ctx: StageContext
    train: ImageSet
    val: ImageSet
    augmentation: Augmentation | None


class FineTuneTrainer(Trainer):
    """The trainer skeleton: :meth:`check` the inputs, :func:`start` (params, seeds, device,
    trainable copy, budget), then :meth:`fit` the copy. Subclasses fill in the two hooks."""

    name: ClassVar[str]
    needs_groups: ClassVar[bool] = False  # every training row must carry a subgroup

    def train(
        self,
        ctx: StageContext,
        model: nn.Module,
        train: ImageSet,
        val: ImageSet,
        augmentation: Augmentation | None,
    ) -> TrainResult:
        job = Job(ctx, train, val, augmentation)
        self.check(job)
        return self.fit(job, start(ctx, model, self.name))

    def check(self, job: Job) -> None:
        """Reject unusable inputs before anything is seeded or copied."""
        if self.needs_groups:
            require_groups(job.train, self.name)

    @abstractmethod
    def fit(self, job: Job, run: Start) -> TrainResult:
        """Train ``run.net`` (the copy) and return it."""


class EpochTrainer(FineTuneTrainer):
    """A skeleton whose body is :func:`run_epochs`: ``len(train) // batch_size`` optimizer steps
    per epoch, the best epoch on ``val`` kept. Subclasses fill in :meth:`prepare`."""

    def fit(self, job: Job, run: Start) -> TrainResult:
        step = self.prepare(job, run)
        steps = max(1, len(job.train) // run.budget.batch_size)
        optimizer = make_optimizer(run.net, run.params, run.budget.lr)
        return run_epochs(job.ctx, run.net, job.val, step, steps, run.budget, optimizer)

    @abstractmethod
    def prepare(self, job: Job, run: Start) -> StepFn:
        """Build the per-run state (sampler, DRO weights, pairing) and the step: one batch,
        returning (loss, metrics)."""

"""Prepares the demo's working directory: data, the base model, the registry, the config, a token.

Everything is reused on a second run: the base model is trained once, imported once.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from patchd.demo.plan import DemoPlan
from patchd.demo.pool import ProductionPool

log = logging.getLogger(__name__)

MODEL_NAME = "demo"
FACTORY = "patchd.ml.models:small_cnn"


@dataclass(frozen=True)
class Workspace:
    plan: DemoPlan
    token: str
    before: ProductionPool  # traffic before promotion
    after: ProductionPool  # traffic after promotion (disjoint images)
    class_names: tuple[str, ...]
    base_eval: dict[str, float]  # base model's per-cell accuracy on the test split


def dataset_spec(plan: DemoPlan) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": plan.dataset, "image_size": plan.image_size, "seed": 0}
    if plan.n_train:
        spec["n_train"] = plan.n_train
    return spec


def prepare(plan: DemoPlan, port: int) -> Workspace:
    import torch

    from patchd.config import DatasetSpec
    from patchd.ml.datasets import load_splits

    torch.set_num_threads(max(1, torch.get_num_threads()))
    plan.root.mkdir(parents=True, exist_ok=True)
    splits = load_splits(DatasetSpec(**dataset_spec(plan)))
    base_eval = _base_model(plan, splits)
    _reset_run_state(plan)
    _register(plan)
    token = _token(plan.state_dir / "admin.token")  # where `patchd approve -c ...` finds it
    write_config(plan, splits.train.class_names, port)
    before, after = ProductionPool(splits.val, seed=7).halves()
    return Workspace(plan, token, before, after, splits.train.class_names, base_eval)


def _base_model(plan: DemoPlan, splits: Any) -> dict[str, float]:
    """Train the base model with plain ERM on the colour-correlated train split (once)."""
    from patchd.ml.evaluate import evaluate_model
    from patchd.ml.models import build_from_factory, load_weights, pick_device, save_weights
    from patchd.ml.training import fit

    model = build_from_factory(FACTORY, {"num_classes": 2})
    if plan.base_weights.is_file():
        load_weights(model, plan.base_weights)
        log.info("reusing base model %s", plan.base_weights)
    else:
        plan.base_weights.parent.mkdir(parents=True, exist_ok=True)
        fit(
            model,
            splits.train,
            epochs=plan.base_epochs,
            batch_size=64,
            lr=1e-3,
            device=pick_device(),
            seed=0,
        )
        save_weights(model.cpu(), plan.base_weights)
    report = evaluate_model(model.cpu(), splits.test, train_mix=splits.train)
    return {c.key: c.accuracy for c in report.cells}


def _reset_run_state(plan: DemoPlan) -> None:
    """A rerun starts over from the base model with an empty store and no run artifacts; the
    trained base model and the registry's versions are kept (and reused)."""
    for suffix in ("", "-wal", "-shm"):
        (plan.state_dir / f"patchd.db{suffix}").unlink(missing_ok=True)
    for folder in (plan.state_dir / "artifacts", plan.images_dir, plan.root / "logs"):
        shutil.rmtree(folder, ignore_errors=True)
    plan.images_dir.mkdir(parents=True)


def _register(plan: DemoPlan) -> None:
    """The base model is production: imported on the first run, promoted back on a rerun."""
    from patchd.promotion.registry import Registry, sha256_file

    registry = Registry(plan.state_dir / "registry")
    current = registry.production(MODEL_NAME, verify=False)
    if current is None:
        registry.import_model(MODEL_NAME, plan.base_weights, approved_by="demo-setup")
    elif current.sha256 != sha256_file(plan.base_weights):
        registry.promote(MODEL_NAME, sha256_file(plan.base_weights), approved_by="demo-rerun")


def _token(path: Path) -> str:
    """The demo's admin token, created once with mode 0600."""
    if path.is_file():
        return path.read_text().strip()
    token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def write_config(plan: DemoPlan, class_names: tuple[str, ...], port: int) -> None:
    """The patchd.yaml the demo's serve and worker read."""
    config = {
        "state_dir": str(plan.state_dir),
        "model": {
            "name": MODEL_NAME,
            "factory": FACTORY,
            "factory_kwargs": {"num_classes": 2},
            "class_names": list(class_names),
        },
        "groups": {"attributes": ["color"], "values": {"color": ["red", "green"]}},
        "data": {"train": dataset_spec(plan)},
        "sources": {"allowed_roots": [str(plan.images_dir)]},
        "monitor": {
            "interval_s": 1.0,
            "window": plan.monitor_window,
            "n_min": 20,
            "reference_window": 200,
            "cooldown_s": 30.0,
        },
        "trigger": {"min_interval_s": 0},
        "patch": {**plan.recipe, "seed": 0},
        "gate": {"n_min": 20, "auto_promote": False},
        "redis": {"queue_prefix": "patchd-demo"},
        "api": {"port": port},
    }
    plan.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

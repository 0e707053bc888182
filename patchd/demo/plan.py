"""The demo's sizes and recipe: the full run (colored-fmnist) and ``--fast`` (colored-digits)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DemoPlan:
    root: Path
    dataset: str  # "colored-fmnist" | "colored-digits"
    image_size: int
    n_train: int | None
    base_epochs: int
    stationary_events: int  # before the shift, minority share `minority_before`
    shift_events_max: int  # after the shift, until a run is triggered
    after_events: int  # after promotion, to measure recovery
    minority_before: float = 0.02
    minority_after: float = 0.5
    label_delay_s: float = 0.5  # labels arrive this late
    rate_per_s: float = 150.0
    monitor_window: int = 600
    recipe: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 900.0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def config_path(self) -> Path:
        return self.root / "patchd.yaml"

    @property
    def base_weights(self) -> Path:
        return self.root / "base" / "model.safetensors"


def make_plan(root: Path, fast: bool) -> DemoPlan:
    if fast:
        return DemoPlan(
            root=root,
            dataset="colored-digits",
            image_size=16,
            n_train=None,
            base_epochs=8,
            stationary_events=300,
            shift_events_max=1500,
            after_events=500,
            monitor_window=400,
            recipe={
                "augmenter": "cyclegan",
                "trainer": "camel",
                "budget": {"epochs": 20, "augment_epochs": 10, "batch_size": 64, "lr": 1e-3},
                "params": {"cyclegan": {"steps": 200}},
            },
            timeout_s=400.0,
        )
    return DemoPlan(
        root=root,
        dataset="colored-fmnist",
        image_size=28,
        n_train=20000,
        base_epochs=4,
        stationary_events=1000,
        shift_events_max=4000,
        after_events=1500,
        monitor_window=1500,
        recipe={
            "augmenter": "cyclegan",
            "trainer": "camel",
            "budget": {"epochs": 4, "augment_epochs": 10, "batch_size": 128, "lr": 1e-3},
        },
        timeout_s=1800.0,
    )

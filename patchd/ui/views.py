"""What the approval pages show, as frozen view objects built from the components' own records.

The routes read the monitor, runs and candidates components (through ``Services.component``) and
turn their records into these; the templates only format.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

from patchd.config import MonitorConfig
from patchd.monitor.engine import MonitorSnapshot
from patchd.promotion.audit import AuditEntry
from patchd.promotion.registry import Pointer
from patchd.runs import regions as region_store
from patchd.runs.jobqueue import STAGES
from patchd.runs.records import RunRecord

HISTORY_ACTIONS = ("promoted", "rolled_back", "imported", "auto_promoted")
DECISION_ACTIONS = ("approved", "rejected", "expired", "evaluated")


@dataclass(frozen=True)
class StageStep:
    stage: str
    status: str  # done | running | queued | failed | cancelled | pending
    seconds: float | None


@dataclass(frozen=True)
class RunView:
    record: RunRecord
    steps: tuple[StageStep, ...]

    @property
    def done(self) -> int:
        return sum(s.status == "done" for s in self.steps)


@dataclass(frozen=True)
class DriftCell:
    feature: str
    score: float
    drifted: bool


@dataclass(frozen=True)
class CellView:
    cls: str
    group: str
    n: int
    accuracy: float | None
    ci_low: float | None
    ci_high: float | None
    reference: float | None
    threshold: float | None
    state: str
    evidence: float
    share: float | None
    drift: tuple[DriftCell, ...]


@dataclass(frozen=True)
class ModelView:
    name: str
    snapshot_ts: float | None
    n: int
    reference: str
    worst_group_accuracy: float | None
    worst_cell: tuple[str, str] | None
    cells: tuple[CellView, ...]
    production: Pointer | None
    alerts: int  # cells not ok
    drift_note: str | None = None  # why the drift column is empty, when it is

    @property
    def status(self) -> str:
        states = {c.state for c in self.cells}
        return next((s for s in ("degraded", "warning") if s in states), "ok")


@dataclass(frozen=True)
class RegionView:
    region: int
    weight: float | None
    n_codes: int | None
    source: str
    mix: tuple[tuple[str, int | None], ...]  # the model's predictions on the samples
    spread_ratio: float | None
    novelty: float | None
    label: str | None  # None: unlabelled (the source class is never shown as a label)
    by: str | None


@dataclass(frozen=True)
class RegionsPage:
    run_id: str
    regions: tuple[RegionView, ...]
    classes: tuple[str, ...]  # what a region may be labelled with (besides "invalid")
    closed: str | None  # why labels are no longer taken, None while they are

    @property
    def n_labelled(self) -> int:
        return sum(r.label is not None for r in self.regions)

    @property
    def people(self) -> str | None:
        names = sorted({r.by for r in self.regions if r.label is not None and r.by})
        return ", ".join(names) if names else None


def _number(x: object) -> float | None:
    return float(x) if isinstance(x, int | float) and math.isfinite(x) else None


def regions_page(run: Path, class_names: tuple[str, ...]) -> RegionsPage:
    """A run's Defuse regions, heaviest first, with their labels (NotFoundError: no regions)."""
    found = region_store.load_regions(run)
    labels = region_store.read_labels(region_store.labels_path(run))
    shown = []
    for r in sorted(found, key=lambda r: -(_number(r.get("weight")) or 0.0)):
        region = int(r["region"])
        n_codes = r.get("n_codes")
        shown.append(
            RegionView(
                region=region,
                weight=_number(r.get("weight")),
                n_codes=n_codes if isinstance(n_codes, int) else None,
                source=str(r.get("source_name", "?")),
                mix=tuple(region_store.prediction_mix(r)),
                spread_ratio=region_store.spread_ratio(r),
                novelty=_number(r.get("novelty")),
                label=labels.labels.get(region),
                by=labels.by(region),
            )
        )
    return RegionsPage(
        run_id=run.name,
        regions=tuple(shown),
        classes=tuple(region_store.class_choices(found, class_names)),
        closed=region_store.labelling_closed(run),
    )


def run_view(rec: RunRecord) -> RunView:
    """Each stage's status from the record (finished stages have a time; the current one not)."""
    steps = []
    for stage in STAGES:
        seconds = rec.stage_times.get(stage)
        if seconds is not None:
            status = "done"
        elif stage == rec.stage:
            status = {"running": "running", "failed": "failed", "cancelled": "cancelled"}.get(
                rec.state, "queued"
            )
        else:
            status = "pending"
        steps.append(StageStep(stage, status, seconds))
    return RunView(rec, tuple(steps))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def drift_note(snap: MonitorSnapshot, config: MonitorConfig) -> str | None:
    """Why drift is missing: no frozen reference yet, no pass yet, or too few predictions."""
    if snap.reference.startswith("learning"):
        return f"Drift: none until the reference is frozen (reference {snap.reference})."
    every = f"every {config.drift_interval_s:g} s"
    need = f"at least {config.drift_min_samples} predictions of a group"
    if not snap.drift:
        return (
            f"Drift: not computed yet or too few predictions; the label-free pass runs {every} "
            f"over the newest {config.drift_window} predictions and needs {need} there and in "
            "the reference."
        )
    return f"Drift runs {every}; a group without scores had fewer than {need}."


def model_view(
    name: str,
    snap: MonitorSnapshot | None,
    production: Pointer | None,
    config: MonitorConfig | None = None,
) -> ModelView:
    if snap is None:
        return ModelView(name, None, 0, "not started", None, None, (), production, 0)
    drift: dict[str, list[DriftCell]] = {}
    for d in snap.drift:
        drift.setdefault(d.group, []).append(DriftCell(d.feature, d.score, d.drifted))
    cells = tuple(
        CellView(
            cls=c.stats.cls,
            group=c.stats.group,
            n=c.stats.n,
            accuracy=_finite(c.stats.accuracy) if c.stats.n else None,
            ci_low=_finite(c.stats.ci_low) if c.stats.n else None,
            ci_high=_finite(c.stats.ci_high) if c.stats.n else None,
            reference=_finite(c.reference_accuracy),
            threshold=_finite(c.threshold),
            state=c.state,
            evidence=c.evidence,
            share=snap.shares.get(c.stats.group) if c.stats.cls == "*" else None,
            drift=tuple(drift.get(c.stats.group, ())) if c.stats.cls == "*" else (),
        )
        for c in snap.cells
    )
    return ModelView(
        name=name,
        snapshot_ts=snap.ts,
        n=snap.n,
        reference=snap.reference,
        worst_group_accuracy=_finite(snap.worst_group_accuracy),
        worst_cell=snap.worst_cell,
        cells=cells,
        production=production,
        alerts=sum(c.state != "ok" for c in cells),
        drift_note=drift_note(snap, config) if config is not None else None,
    )


def history(entries: list[AuditEntry], model: str, limit: int = 50) -> list[AuditEntry]:
    """The audit lines about ``model``, newest first."""
    wanted = HISTORY_ACTIONS + DECISION_ACTIONS
    return [e for e in reversed(entries) if e.model == model and e.action in wanted][:limit]


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def num(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def short(digest: str | None) -> str:
    return (digest or "-")[:12]

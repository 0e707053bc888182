"""``GET /v1/groups`` (scope ``read``): the per-cell table of the monitor's latest snapshot."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends

from patchd.api.auth import require_scope
from patchd.monitor.engine import CellReport, MonitorSnapshot

LABEL_FREE_NOTE = (
    "drift scores are label-free signals (inputs or model behaviour moved); they are never "
    "used as accuracy"
)


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def cell_json(
    c: CellReport, drift: dict[str, dict[str, float]], shares: dict[str, float]
) -> dict[str, Any]:
    s = c.stats
    return {
        "class": s.cls,
        "group": s.group,
        "n": s.n,
        "correct": s.correct,
        "accuracy": _num(s.accuracy),
        "ci_low": _num(s.ci_low) if s.n else None,
        "ci_high": _num(s.ci_high) if s.n else None,
        "reference_accuracy": _num(c.reference_accuracy),
        "threshold": _num(c.threshold),
        "state": c.state,
        "evidence": round(c.evidence, 4),
        "mean_confidence": _num(s.mean_confidence),
        "pred_mix": list(s.pred_mix),
        "share": shares.get(s.group),
        "drift": drift.get(s.group, {}),
    }


def snapshot_json(snap: MonitorSnapshot | None, model: str) -> dict[str, Any]:
    if snap is None:
        return {
            "model": model,
            "ts": None,
            "n": 0,
            "reference": "not started",
            "cells": [],
            "drift": [],
            "shares": {},
            "worst_group_accuracy": None,
            "worst_cell": None,
        }
    drift: dict[str, dict[str, float]] = {}
    for d in snap.drift:
        drift.setdefault(d.group, {})[d.feature] = round(d.score, 6)
    return {
        "model": snap.model,
        "ts": snap.ts,
        "n": snap.n,
        "reference": snap.reference,
        "worst_group_accuracy": _num(snap.worst_group_accuracy),
        "worst_cell": list(snap.worst_cell) if snap.worst_cell else None,
        "alarm_threshold": snap.alarm_threshold,
        "tick_seconds": round(snap.tick_seconds, 6),
        "shares": snap.shares,
        "cells": [cell_json(c, drift, snap.shares) for c in snap.cells],
        "drift": [
            {
                "group": d.group,
                "feature": d.feature,
                "score": d.score,
                "drifted": d.drifted,
                "method": d.method,
                "n_reference": d.n_reference,
                "n_current": d.n_current,
                "label_free": d.label_free,
            }
            for d in snap.drift
        ],
        "note": LABEL_FREE_NOTE,
    }


def groups_router(
    model: str,
    snapshot: Callable[[], MonitorSnapshot | None],
    requests: Callable[[], list[dict[str, Any]]],
) -> APIRouter:
    router = APIRouter(tags=["monitor"])

    @router.get("/v1/groups", dependencies=[Depends(require_scope("read"))])
    def groups() -> dict[str, Any]:
        return {**snapshot_json(snapshot(), model), "patch_requests": requests()}

    return router

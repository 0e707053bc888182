"""``GET /v1/groups`` (scope ``read``): the per-cell table of the monitor's latest snapshot."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends

from patchd.api.auth import require_scope
from patchd.monitor.engine import CellReport, MonitorSnapshot
from patchd.monitor.estimate import Estimate
from patchd.monitor.groups import ALL
from patchd.monitor.mined import ATTRIBUTE, MinedStatus

LABEL_FREE_NOTE = (
    "drift scores are label-free signals (inputs or model behaviour moved); they are never "
    "used as accuracy. estimated_accuracy (and the estimates list, per predicted class x "
    "group) is a label-free estimate with an interval, null where it is unreliable; the alert "
    "policy never reads it as accuracy"
)


def _num(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def estimate_json(e: Estimate, degraded: bool) -> dict[str, Any]:
    shown = e.reliable and math.isfinite(e.accuracy)
    return {
        "class": e.cls,  # the predicted class ("*": the group pooled over predicted classes)
        "group": e.group,
        "n": e.n,
        "estimated_accuracy": _num(e.accuracy) if shown else None,
        "ci_low": _num(e.ci_low) if shown else None,
        "ci_high": _num(e.ci_high) if shown else None,
        "reliable": e.reliable,
        "unreliable_reason": e.reason,
        "reference_accuracy": _num(e.reference_accuracy),
        "n_labeled": e.n_labeled,
        "realized_accuracy": _num(e.realized_accuracy),
        "state": "estimated_degraded" if degraded else "ok" if e.reliable else "unreliable",
    }


def _beside(e: Estimate | None, degraded: bool) -> dict[str, Any]:
    """The pooled row's estimate, shown beside its labeled accuracy."""
    if e is None:
        return {"estimated_accuracy": None, "estimate_state": "none"}
    j = estimate_json(e, degraded)
    return {
        "estimated_accuracy": j["estimated_accuracy"],
        "estimated_ci_low": j["ci_low"],
        "estimated_ci_high": j["ci_high"],
        "estimate_state": j["state"],
        "estimate_note": e.reason,
    }


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
            "estimator": "none",
            "estimates": [],
            "mined_groups": None,
        }
    degraded = snap.estimated_degraded
    pooled = {e.group: e for e in snap.estimates if e.cls == ALL}
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
        "cells": [
            {
                **cell_json(c, drift, snap.shares),
                **(
                    _beside(pooled.get(c.stats.group), (ALL, c.stats.group) in degraded)
                    if c.stats.cls == ALL
                    else {}
                ),
            }
            for c in snap.cells
        ],
        "estimator": snap.estimator,
        "estimates": [estimate_json(e, (e.cls, e.group) in degraded) for e in snap.estimates],
        "mined_groups": mined_json(snap.mined),
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


def mined_json(status: MinedStatus | None) -> dict[str, Any] | None:
    """The mined pseudo-groups in use (``mined=member|rest|unknown``), None when off."""
    if status is None:
        return None
    return {
        "active": status.active,
        "attribute": ATTRIBUTE,
        "note": status.note,
        "source": status.source,
        "run_id": status.run_id,
        "incumbent_sha256": status.incumbent_sha256,
        "embedding_dim": status.embedding_dim,
        "descriptions": list(status.descriptions),
        "skipped": dict(status.skipped),
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

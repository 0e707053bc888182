"""The one function degradation uses to ask for a patch run: :func:`request_patch`.

With the runs component in serve, it calls ``RunsComponent.request_run`` (which keeps one open run
per model). Without it, the request is recorded in the kv table under ``monitor:patch_requests``
(versioned JSON) with the same one-open-request-per-model rule, so nothing is lost until the
pipeline exists. ``trigger.enabled`` switches it off; ``trigger.min_interval_s`` spaces requests
for one model (the last request time lives in the same kv record, so it survives restarts).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from patchd.domain import PatchRequested
from patchd.exceptions import NotFoundError, PatchdError
from patchd.store.backend import put_kv

if TYPE_CHECKING:
    from patchd.services import Services
    from patchd.store.backend import Connection

log = logging.getLogger(__name__)

KV_KEY = "monitor:patch_requests"
VERSION = 1
KEEP = 100  # requests kept in the kv record


@dataclass(frozen=True)
class TriggerResult:
    model: str
    outcome: str  # run_created | recorded | already_open | too_soon | disabled | failed
    run_id: str | None = None
    detail: str = ""


def request_patch(
    services: Services, model: str, reason: str, now: float | None = None
) -> TriggerResult:
    """Create (or record) a patch run for ``model`` unless the trigger rules say no."""
    now = time.time() if now is None else now
    cfg = services.config.trigger
    if not cfg.enabled:
        log.info("model=%s: patch not requested, trigger.enabled is false (%s)", model, reason)
        return TriggerResult(model, "disabled")
    with services.store.read() as conn:
        record = _load(conn)
    last = record["last"].get(model)
    if last is not None and now - last < cfg.min_interval_s:
        log.info(
            "model=%s: patch not requested, last request %.0fs ago < trigger.min_interval_s=%.0f",
            model,
            now - last,
            cfg.min_interval_s,
        )
        return TriggerResult(model, "too_soon")
    runs = _runs_component(services)
    result = (
        _via_runs(runs, model, reason) if runs is not None else _record_only(record, model, reason)
    )
    if result.outcome in ("run_created", "recorded", "failed"):
        _remember(services, model, reason, now, result)
    if result.outcome in ("run_created", "recorded"):
        services.bus.publish(PatchRequested(model=model, reason=reason))
        log.info("model=%s: patch requested (%s): %s", model, result.outcome, reason)
    return result


def _runs_component(services: Services) -> Any | None:
    try:
        from patchd.runs.component import RunsComponent
    except ImportError:
        return None
    try:
        return services.component("runs", RunsComponent)
    except NotFoundError:
        return None


def _via_runs(runs: Any, model: str, reason: str) -> TriggerResult:
    try:
        rec = runs.request_run(model, reason)
    except PatchdError as err:
        log.warning("model=%s: the runs component refused the patch request: %s", model, err)
        return TriggerResult(model, "failed", detail=str(err))
    if rec is None:
        return TriggerResult(model, "already_open")
    return TriggerResult(model, "run_created", run_id=rec.id)


def _record_only(record: dict[str, Any], model: str, reason: str) -> TriggerResult:
    if any(r["model"] == model and r["status"] == "open" for r in record["requests"]):
        return TriggerResult(model, "already_open")
    return TriggerResult(model, "recorded")


def _remember(
    services: Services, model: str, reason: str, now: float, result: TriggerResult
) -> None:
    with services.store.write() as conn:
        record = _load(conn)
        record["last"][model] = now
        status = {"recorded": "open", "run_created": "run"}.get(result.outcome, result.outcome)
        entry = {
            "model": model,
            "reason": reason,
            "ts": now,
            "status": status,
            "run_id": result.run_id,
        }
        record["requests"] = [*record["requests"], entry][-KEEP:]
        put_kv(conn, KV_KEY, json.dumps(record), now)


def _load(conn: Connection) -> dict[str, Any]:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (KV_KEY,)).fetchone()
    if row is None:
        return {"version": VERSION, "last": {}, "requests": []}
    data = json.loads(row[0])
    if data.get("version") != VERSION:
        log.warning(
            "%s has version %r, expected %d: starting a new record",
            KV_KEY,
            data.get("version"),
            VERSION,
        )
        return {"version": VERSION, "last": {}, "requests": []}
    return data


def patch_requests(conn: Connection) -> list[dict[str, Any]]:
    """The recorded requests (newest last), for the API and tests."""
    return list(_load(conn)["requests"])

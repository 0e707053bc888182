"""The run record: one row of the store's ``runs`` table, its states, and its SQL.

States: ``requested → queued → running → succeeded | failed | cancelled``. Only
:class:`patchd.runs.component.RunsComponent` writes these rows. A run whose ``vae`` augmenter
found Defuse failure regions pauses after synthesize in ``awaiting_labels`` (open; its
``result["labels"]`` holds the region count, since when and the deadline) until a person resumes
it (``result["labels"]["by"]`` then says who) or the deadline passes (failed).

A succeeded run has an ``outcome``: ``candidate`` (its model goes to the gate) or
``no_improvement`` (no fine-tuning epoch beat the incumbent on validation: no weights were
written, no candidate is registered, the incumbent stays; ``outcome_message`` says what was
found). Open, failed and cancelled runs have none.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from patchd.runs.recipe import Recipe
from patchd.store.backend import Connection

AWAITING_LABELS = "awaiting_labels"  # paused after synthesize for a person's region labels
OPEN_STATES = ("requested", "queued", "running", AWAITING_LABELS)
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
NO_IMPROVEMENT = "no_improvement"  # the outcome of a succeeded run that kept the incumbent
NO_IMPROVEMENT_TEXT = "no improvement found, incumbent kept"
_COLUMNS = (
    "id, model, state, stage, reason, recipe, job_ids, stage_times, error, result, "
    "created_at, updated_at"
)


@dataclass(frozen=True)
class RunRecord:
    id: str
    model: str
    state: str
    stage: str | None
    reason: str
    recipe: dict[str, Any]
    job_ids: dict[str, str]
    stage_times: dict[str, float]
    error: str | None
    result: dict[str, Any] | None
    created_at: float
    updated_at: float

    @property
    def open(self) -> bool:
        return self.state in OPEN_STATES

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RunRecord:
        rid, model, state, stage, reason, recipe, jobs, times, error, result, c, u = row
        return cls(
            rid,
            model,
            state,
            stage,
            reason,
            json.loads(recipe),
            json.loads(jobs),
            json.loads(times),
            error,
            json.loads(result) if result else None,
            c,
            u,
        )

    @property
    def outcome(self) -> str | None:
        """``candidate`` | ``no_improvement`` for a succeeded run, else None."""
        if self.state != "succeeded":
            return None
        return run_outcome(self.result) or "candidate"

    @property
    def outcome_message(self) -> str | None:
        if self.outcome != NO_IMPROVEMENT:
            return None
        stage = (self.result or {}).get("result") or {}
        return str(stage.get("message") or NO_IMPROVEMENT_TEXT)

    @property
    def outcome_text(self) -> str | None:
        """The line the CLI and the UI show for a run that kept the incumbent (else None)."""
        return outcome_text(self.outcome, self.outcome_message)

    @property
    def disk_bytes(self) -> int | None:
        """Bytes the run's artifacts took after its last finished stage (None before one)."""
        stage = (self.result or {}).get("result")
        value = stage.get("run_disk_bytes") if isinstance(stage, dict) else None
        return int(value) if isinstance(value, int | float) else None

    @property
    def labels(self) -> dict[str, Any] | None:
        """The region-label pause of a Defuse run: ``regions``, ``since``, ``deadline`` and, once
        resumed, ``by`` and ``at`` (None for a run that never paused)."""
        found = (self.result or {}).get("labels")
        return found if isinstance(found, dict) else None

    def to_dict(self) -> dict[str, Any]:
        """The API view: the recipe without the full config, plus the outcome."""
        body = asdict(self)
        body["outcome"], body["outcome_message"] = self.outcome, self.outcome_message
        body["disk_bytes"] = self.disk_bytes
        body["labels"] = self.labels
        recipe = dict(self.recipe)
        body["recipe"] = Recipe(**recipe).summary() if "config" in recipe else recipe
        return body


def outcome_text(outcome: object, message: object) -> str | None:
    """``no improvement found, incumbent kept: <message>`` for a no-improvement run, else None.

    Takes the ``outcome`` / ``outcome_message`` of a record or of its API view.
    """
    if outcome != NO_IMPROVEMENT:
        return None
    if not message or message == NO_IMPROVEMENT_TEXT:
        return NO_IMPROVEMENT_TEXT
    return f"{NO_IMPROVEMENT_TEXT}: {message}"


def run_outcome(job_result: dict[str, Any] | None) -> str | None:
    """The ``outcome`` the last stage reported in its job result (None when it names none)."""
    stage = (job_result or {}).get("result")
    outcome = stage.get("outcome") if isinstance(stage, dict) else None
    return str(outcome) if outcome else None


def _row(rec: RunRecord) -> dict[str, Any]:
    """The record as the runs table's columns (JSON columns encoded), for named parameters."""
    return {
        "id": rec.id,
        "model": rec.model,
        "state": rec.state,
        "stage": rec.stage,
        "reason": rec.reason,
        "recipe": json.dumps(rec.recipe),
        "job_ids": json.dumps(rec.job_ids),
        "stage_times": json.dumps(rec.stage_times),
        "error": rec.error,
        "result": json.dumps(rec.result) if rec.result is not None else None,
        "created_at": rec.created_at,
        "updated_at": rec.updated_at,
    }


_INSERT = (
    f"INSERT INTO runs ({_COLUMNS}) VALUES ({', '.join(f':{c}' for c in _COLUMNS.split(', '))})"
)
_UPDATE = (
    "UPDATE runs SET state=:state, stage=:stage, recipe=:recipe, job_ids=:job_ids, "
    "stage_times=:stage_times, error=:error, result=:result, updated_at=:updated_at WHERE id=:id"
)


def insert_run(conn: Connection, rec: RunRecord) -> None:
    conn.execute(_INSERT, _row(rec))


def update_run(conn: Connection, rec: RunRecord) -> None:
    conn.execute(_UPDATE, _row(rec))


def select_runs(conn: Connection, where: str, args: tuple[Any, ...]) -> list[RunRecord]:
    rows = conn.execute(f"SELECT {_COLUMNS} FROM runs {where}", args).fetchall()
    return [RunRecord.from_row(r) for r in rows]


def new_run_id(model: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model)[:40]
    return f"{safe}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"

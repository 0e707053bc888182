"""The ``candidates`` table: every SQL statement about candidates, and nothing else.

Each state change is a compare-and-set (``UPDATE ... WHERE state = <expected>``) inside the
caller's transaction, so two concurrent decisions resolve to exactly one outcome.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from patchd.exceptions import ConflictError, NotFoundError
from patchd.promotion.record import COLUMNS, Candidate, CandidateState
from patchd.store.backend import Connection

if TYPE_CHECKING:
    from patchd.evaluation import PairedEvaluation
    from patchd.promotion.gate import GateDecision
    from patchd.store.backend import Store

_SELECT = f"SELECT {', '.join(COLUMNS)} FROM candidates"
_INSERT = (
    "INSERT INTO candidates (id, model, run_id, digest, state, created_at, updated_at, parent)"
    " VALUES (:id, :model, :run_id, :digest, :state, :now, :now, :parent)"
    " ON CONFLICT(id) DO UPDATE SET digest = excluded.digest, parent = excluded.parent,"
    " updated_at = excluded.updated_at"
)
_FINISH = (
    "UPDATE candidates SET state = :state, verdict = :verdict, gate = :gate,"
    " evaluation = :evaluation, expires_at = :expires_at, note = :note, updated_at = :now"
    " WHERE id = :id AND state = :evaluating"
)
_TRANSITION = (
    "UPDATE candidates SET state = :new, decided_by = :actor, decided_at = :now,"
    " updated_at = :now, note = coalesce(:note, note) WHERE id = :id AND state = :old"
)


class CandidateStore:
    """Reads and compare-and-set writes of candidate rows in serve's store."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    def get(self, candidate_id: str) -> Candidate:
        with self.store.read() as conn:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (candidate_id,)).fetchone()
        if row is None:
            raise NotFoundError("candidate", candidate_id)
        return Candidate.from_row(row)

    def list(
        self, model: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Candidate]:
        sql = f"{_SELECT} WHERE 1=1"
        args: list[str] = []
        if model:
            sql, args = sql + " AND model = ?", [*args, model]
        if state:
            sql, args = sql + " AND state = ?", [*args, state]
        with self.store.read() as conn:
            rows = conn.execute(sql + " ORDER BY created_at DESC LIMIT ?", (*args, limit))
            return [Candidate.from_row(r) for r in rows.fetchall()]

    def state_counts(self) -> tuple[dict[str, int], float]:
        """Candidates per state, and the age of the oldest awaiting approval (0 when none)."""
        with self.store.read() as conn:
            counts = dict(conn.execute("SELECT state, count(*) FROM candidates GROUP BY state"))
            oldest = conn.execute(
                "SELECT min(updated_at) FROM candidates WHERE state = ?",
                (CandidateState.AWAITING_APPROVAL.value,),
            ).fetchone()[0]
        return counts, (self.clock() - oldest) if oldest else 0.0

    def evaluation_json(self, candidate_id: str) -> str | None:
        """The stored paired evaluation of a gated candidate (None before the gate ran)."""
        with self.store.read() as conn:
            row = conn.execute(
                "SELECT evaluation FROM candidates WHERE id = ?", (candidate_id,)
            ).fetchone()
        return row[0] if row and row[0] else None

    def promoted_ids(
        self, conn: Connection, model: str, digest: str
    ) -> builtins.list[str]:  # `list` here is the method above
        """The promoted candidates of ``model`` at ``digest`` (inside the caller's transaction)."""
        rows = conn.execute(
            "SELECT id FROM candidates WHERE model = ? AND digest = ? AND state = ?",
            (model, digest, CandidateState.PROMOTED.value),
        )
        return [r[0] for r in rows]

    def insert_evaluating(
        self, cid: str, model: str, run_id: str, digest: str, parent: str | None
    ) -> None:
        """A new candidate in ``evaluating`` (a re-evaluation updates digest and parent)."""
        row = {
            "id": cid,
            "model": model,
            "run_id": run_id,
            "digest": digest,
            "state": CandidateState.EVALUATING.value,
            "now": self.clock(),
            "parent": parent,
        }
        with self.store.write() as conn:
            conn.execute(_INSERT, row)

    def finish_evaluation(
        self,
        cid: str,
        state: CandidateState,
        decision: GateDecision | None,
        evaluation: PairedEvaluation | None,
        *,
        expires_at: float | None = None,
        note: str | None = None,
    ) -> None:
        """``evaluating`` → the gate's state, with the decision and the evidence."""
        row = {
            "id": cid,
            "state": state.value,
            "verdict": decision.verdict.value if decision else None,
            "gate": json.dumps(decision.to_dict()) if decision else None,
            "evaluation": evaluation.to_json() if evaluation is not None else None,
            "expires_at": expires_at,
            "note": note,
            "now": self.clock(),
            "evaluating": CandidateState.EVALUATING.value,
        }
        with self.store.write() as conn:
            conn.execute(_FINISH, row)

    def transition(
        self,
        conn: Connection,
        cid: str,
        old: CandidateState,
        new: CandidateState,
        actor: str,
        note: str | None = None,
    ) -> None:
        """``old`` → ``new`` in the caller's transaction; ConflictError if it was not ``old``."""
        args = {
            "id": cid,
            "old": old.value,
            "new": new.value,
            "actor": actor,
            "now": self.clock(),
            "note": note,
        }
        if conn.execute(_TRANSITION, args).rowcount != 1:
            raise ConflictError(f"candidate {cid} is no longer {old.value}; nothing changed")

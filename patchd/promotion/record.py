"""A candidate as stored (one row of the ``candidates`` table) and its lifecycle states.

Lifecycle (docs/architecture.md, "Promotion")::

    evaluating -> pass | fail | inconclusive;  pass -> awaiting_approval
    awaiting_approval -> promoted | rejected | expired;  promoted -> rolled_back
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.promotion.gate import GateDecision

if TYPE_CHECKING:
    from patchd.evaluation import PairedEvaluation


class CandidateState(enum.StrEnum):
    EVALUATING = "evaluating"
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    EXPIRED = "expired"
    ROLLED_BACK = "rolled_back"


STATES = tuple(s.value for s in CandidateState)
# states whose registry version the garbage collector keeps
PENDING = (CandidateState.EVALUATING, CandidateState.PASS, CandidateState.AWAITING_APPROVAL)
# the columns of a candidate row, in the order :meth:`Candidate.from_row` reads them
COLUMNS = (
    "id",
    "model",
    "run_id",
    "digest",
    "state",
    "verdict",
    "decided_by",
    "decided_at",
    "expires_at",
    "created_at",
    "updated_at",
    "gate",
    "parent",
    "note",
)


@dataclass(frozen=True)
class Candidate:
    id: str
    model: str
    run_id: str
    digest: str
    state: CandidateState
    verdict: str | None
    decided_by: str | None
    decided_at: float | None
    expires_at: float | None
    created_at: float
    updated_at: float
    gate: GateDecision | None
    parent: str | None
    note: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Candidate:
        """A row selected as ``SELECT <COLUMNS> ...`` (columns matched by name)."""
        values = dict(zip(COLUMNS, row, strict=True))
        gate = values.pop("gate")
        state = CandidateState(values.pop("state"))
        decision = GateDecision.from_dict(json.loads(gate)) if gate else None
        return cls(**values, state=state, gate=decision)

    def to_dict(self) -> dict[str, Any]:
        """The API's view (the gate decision without per-cell counts)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "gate"}
        out["state"] = self.state.value
        if self.gate is not None:
            g = self.gate
            out["gate"] = {
                "verdict": g.verdict.value,
                "reasons": list(g.reasons),
                "worst_group_delta": g.worst_group_delta,
                "worst_group_interval": list(g.worst_group_interval),
                "avg_delta": g.avg_delta,
                "avg_interval": list(g.avg_interval),
                "incumbent_worst": list(g.incumbent_worst),
                "candidate_worst": list(g.candidate_worst),
                "incumbent_avg": g.incumbent_avg,
                "candidate_avg": g.candidate_avg,
            }
        return out


@dataclass(frozen=True)
class RunInputs:
    """What the gate reads from a finished run's artifacts and record."""

    run_dir: Path
    weights: Path
    evaluation_text: str
    recipe: dict[str, Any]
    stage_seconds: dict[str, float]
    parent: str | None
    data_digests: dict[str, str]


def evaluation_summary(evaluation: PairedEvaluation) -> dict[str, Any]:
    data = json.loads(evaluation.to_json())
    return {k: data[k] for k in ("class_names", "group_names", "incumbent", "candidate")}


def audit_metrics(decision: GateDecision | None) -> dict[str, Any]:
    if decision is None:
        return {}
    return {
        "verdict": decision.verdict.value,
        "worst_group_before": decision.incumbent_worst[1],
        "worst_group_after": decision.candidate_worst[1],
        "worst_group_delta": decision.worst_group_delta,
        "worst_group_interval": list(decision.worst_group_interval),
        "avg_before": decision.incumbent_avg,
        "avg_after": decision.candidate_avg,
        "avg_delta": decision.avg_delta,
    }

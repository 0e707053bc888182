"""Candidates: gate a finished patch run, then wait for a person (or ``gate.auto_promote``).

The lifecycle is :class:`~patchd.promotion.record.CandidateState`; ``fail`` and ``inconclusive``
are final: inconclusive is never promoted. The rows live in
:class:`~patchd.promotion.store.CandidateStore`; this module orchestrates.

Decisions (approve, reject, rollback, expire) are serialized by one lock in this process (serve is
the only writer) and each re-checks the candidate's state inside the store transaction that
records it (``UPDATE ... WHERE state = 'awaiting_approval'``), so concurrent calls resolve to
exactly one outcome. The production pointer is switched inside that transaction (compare-and-swap
on the registry's cross-process lock); the audit line is appended and fsynced after the commit and
before the API answers. On start, a crash between the pointer switch and the commit is reconciled
from the pointer (the pointer is the truth for serving).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from patchd.domain import CandidateEvaluated, ModelPromoted, ModelRolledBack, RunFinished
from patchd.exceptions import (
    ConflictError,
    NotFoundError,
    NotLeaderError,
    PatchdError,
    ValidationError,
)
from patchd.promotion.audit import AuditEntry, AuditLog
from patchd.promotion.gate import Verdict, decide, gate_input
from patchd.promotion.hooks import HookEvent, HookRunner
from patchd.promotion.record import (
    PENDING,
    STATES,
    Candidate,
    CandidateState,
    RunInputs,
    audit_metrics,
    evaluation_summary,
)
from patchd.promotion.registry import VersionManifest, open_registry, sha256_file
from patchd.promotion.store import CandidateStore
from patchd.services import Component, Services

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client.registry import Collector

    from patchd.promotion.report.candidate import CandidateReport

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
S = CandidateState


class CandidatesComponent(Component):
    """Gate, registry publication, approval lifecycle, audit, hooks (see the module docstring)."""

    name = "candidates"
    per_model = True

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        from prometheus_client import Counter

        config = services.config
        self.registry = open_registry(config)
        self.clock = services.clock
        self.candidates = CandidateStore(services.store, services.clock)
        self.audit = AuditLog.in_state_dir(config.state_dir)
        self.hooks = HookRunner(config.registry.hooks)
        self._lock = threading.RLock()
        self.promotions = Counter(
            "patchd_promotions", "Promotion decisions by result", ["result"], registry=None
        )
        for result in ("promoted", "rejected", "expired", "rolled_back", "error"):
            self.promotions.labels(result)

    # -- Component ---------------------------------------------------------------------------------
    def routers(self) -> Sequence[APIRouter]:
        from patchd.promotion.api import build_router

        return (build_router(self, self.services.config.model.name),)

    def collectors(self) -> Iterable[Collector]:
        from patchd.promotion.metrics import CandidatesCollector

        return (
            CandidatesCollector(self.candidates.state_counts),
            self.promotions,
            self.hooks.failures,
            self.hooks.calls,
        )

    def start(self) -> None:
        self.services.bus.subscribe(RunFinished, self._on_run_finished)
        ttl = self.services.config.gate.approval_ttl_s
        self.services.scheduler.add_job(
            self.services.leader.guard(self.tick),
            "interval",
            seconds=max(0.5, min(60.0, ttl / 4)),
            id="candidates-expire",
            max_instances=1,
            coalesce=True,
            replace_existing=True,
        )
        self.services.leader.on_elected(self.reconcile)

    def stop(self) -> None:
        self.hooks.join(timeout=5.0)

    def _on_run_finished(self, event: RunFinished) -> None:
        if event.result != "succeeded":
            return
        try:
            self.evaluate_run(event.run_id, event.model)
        except PatchdError as err:
            log.error("candidate for run %s not created: %s", event.run_id, err)

    # -- reads ---------------------------------------------------------------------------------
    def get(self, candidate_id: str) -> Candidate:
        return self.candidates.get(candidate_id)

    def list(
        self, model: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[Candidate]:
        return self.candidates.list(model or self.services.scoped_model, state, limit)

    # -- evaluation ----------------------------------------------------------------------------
    def evaluate_run(self, run_id: str, model: str) -> Candidate:
        """Gate a finished run and register its model as a candidate (idempotent per run)."""
        if not _RUN_ID.match(run_id or ""):
            raise ValidationError("bad_run_id", f"run id {run_id!r} must match {_RUN_ID.pattern}")
        cid = f"c-{run_id}"
        self.services.leader.require(f"evaluate run {run_id}")
        with self._lock:
            try:
                existing = self.get(cid)
                if existing.state != S.EVALUATING:
                    return existing
            except NotFoundError:
                pass
            inputs = self._run_inputs(run_id, model)
            digest = sha256_file(inputs.weights)
            with self.services.store.write() as conn:  # the insert joins this transaction
                self.services.leader.fence(conn, f"create candidate {cid}")
                self.candidates.insert_evaluating(cid, model, run_id, digest, inputs.parent)
            try:
                return self._gate(cid, model, run_id, digest, inputs)
            except NotLeaderError:  # fenced: a newer leader owns the candidate now
                raise
            except Exception as err:  # never leave a candidate stuck in `evaluating`
                note = f"evaluation error: {err}"
                self.candidates.finish_evaluation(cid, S.FAIL, None, None, note=note)
                self._audit_evaluated(cid, model, digest, inputs.parent, f"error: {err}")
                raise

    def _audit_evaluated(
        self,
        cid: str,
        model: str,
        digest: str,
        parent: str | None,
        detail: str,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        """The audit line of a gate evaluation: its verdict, or the error that ended it."""
        metrics = metrics or {}
        entry = AuditEntry("gate", "evaluated", model, digest, cid, parent, metrics, detail)
        self.audit.append(entry)

    def _run_inputs(self, run_id: str, model: str) -> RunInputs:
        from patchd.promotion.inputs import read_run_inputs

        services = self.services
        return read_run_inputs(services.config, services.store, self.registry, run_id, model)

    def _gate(self, cid: str, model: str, run_id: str, digest: str, inputs: RunInputs) -> Candidate:
        from patchd.evaluation import PairedEvaluation

        evaluation = PairedEvaluation.from_json(inputs.evaluation_text)
        decision = decide(gate_input(evaluation), self.services.config.gate)
        state = S.AWAITING_APPROVAL if decision.passed else S(decision.verdict.value)
        manifest = VersionManifest(
            model=model,
            sha256=digest,
            parent=inputs.parent,
            run_id=run_id,
            recipe=inputs.recipe,
            data_digests=inputs.data_digests,
            evaluation=evaluation_summary(evaluation),
            gate=decision.to_dict(),
        )
        self.registry.publish(model, inputs.weights, manifest)
        ttl = self.services.config.gate.approval_ttl_s
        expires = self.clock() + ttl if decision.passed else None
        with self.services.store.write() as conn:
            self.services.leader.fence(conn, f"gate candidate {cid}")
            self.candidates.finish_evaluation(cid, state, decision, evaluation, expires_at=expires)
        self.write_report(cid)
        self._audit_evaluated(
            cid, model, digest, inputs.parent, decision.verdict.value, audit_metrics(decision)
        )
        self.services.bus.publish(
            CandidateEvaluated(
                candidate_id=cid, model=model, digest=digest, verdict=decision.verdict.value
            )
        )
        log.info(
            "candidate %s (run %s, %s@%s): %s",
            cid,
            run_id,
            model,
            digest[:12],
            "; ".join(decision.reasons),
        )
        if decision.passed and self.services.config.gate.auto_promote:
            return self.approve(cid, digest, "gate:auto_promote")
        return self.get(cid)

    # -- reports -------------------------------------------------------------------------------
    def report(self, candidate_id: str) -> CandidateReport:
        """The report of a gated candidate, in its current state."""
        from patchd.promotion.inputs import candidate_report

        cand = self.get(candidate_id)
        evaluation = self.candidates.evaluation_json(candidate_id)
        return candidate_report(self.services.config, cand, evaluation, self.services.store)

    def report_fragment(self, candidate_id: str) -> str:
        """The report as an HTML fragment (``<style>`` + ``<div>``) for the approval pages."""
        from patchd.promotion.report import render_fragment

        return render_fragment(self.report(candidate_id))

    def write_report(self, candidate_id: str) -> None:
        """(Re)write report.json/report.html beside the version's manifest; best effort."""
        from patchd.promotion.report import render_html

        try:
            rep = self.report(candidate_id)
            self.registry.write_files(
                rep.model,
                rep.digest,
                {"report.json": rep.to_json(), "report.html": render_html(rep).encode()},
            )
        except (PatchdError, OSError) as err:
            log.warning("report of candidate %s not written: %s", candidate_id, err)

    # -- decisions -----------------------------------------------------------------------------
    def approve(self, candidate_id: str, digest: str, actor: str, comment: str = "") -> Candidate:
        """Promote an awaiting candidate; ``digest`` must be the candidate's (no stale ones).
        ``comment`` (the approver's words) is kept in the audit entry's ``detail``."""
        self.services.leader.require(f"approve candidate {candidate_id}")
        with self._lock:
            cand = self._awaiting(candidate_id, "approve")
            if digest != cand.digest:
                raise ConflictError(
                    f"approval names digest {digest[:16]!r} but candidate {candidate_id} is "
                    f"{cand.digest[:16]}: the approval is stale or for another model; re-read "
                    "the candidate (patchd candidates) and approve what you reviewed"
                )
            try:
                previous = self._promote_in_tx(cand, actor)
            except PatchdError:
                self.promotions.labels("error").inc()
                raise
            self.audit.append(
                AuditEntry(
                    actor,
                    "promoted",
                    cand.model,
                    cand.digest,
                    cand.id,
                    previous,
                    metrics=audit_metrics(cand.gate),
                    detail=comment,
                )
            )
            self.promotions.labels("promoted").inc()
        self.write_report(candidate_id)
        self.services.bus.publish(
            ModelPromoted(
                model=cand.model, digest=cand.digest, previous=previous, approved_by=actor
            )
        )
        self._fire("promoted", cand.model, cand.digest, previous)
        return self.get(candidate_id)

    def _promote_in_tx(self, cand: Candidate, actor: str) -> str | None:
        current = self.registry.pointer(cand.model)
        current_sha = current.sha256 if current else None
        if current_sha and cand.parent and current_sha != cand.parent:
            raise ConflictError(
                f"candidate {cand.id} was evaluated against {cand.parent[:12]} but production "
                f"of {cand.model} is now {current_sha[:12]}: its evidence is stale; reject it "
                "and run a new patch (patchd patch)"
            )
        with self.services.store.write() as conn:
            self.services.leader.fence(conn, f"promote candidate {cand.id}")
            self.candidates.transition(conn, cand.id, S.AWAITING_APPROVAL, S.PROMOTED, actor)
            self.registry.promote(
                cand.model, cand.digest, actor, expect=current_sha, epoch=self.services.leader.epoch
            )
        return current_sha

    def reject(self, candidate_id: str, actor: str, reason: str = "") -> Candidate:
        self.services.leader.require(f"reject candidate {candidate_id}")
        with self._lock:
            cand = self._awaiting(candidate_id, "reject")
            with self.services.store.write() as conn:
                self.services.leader.fence(conn, f"reject candidate {cand.id}")
                self.candidates.transition(
                    conn, cand.id, S.AWAITING_APPROVAL, S.REJECTED, actor, reason
                )
            self.audit.append(
                AuditEntry(
                    actor,
                    "rejected",
                    cand.model,
                    cand.digest,
                    cand.id,
                    metrics=audit_metrics(cand.gate),
                    detail=reason,
                )
            )
            self.promotions.labels("rejected").inc()
        self.write_report(candidate_id)
        return self.get(candidate_id)

    def rollback(self, model: str, actor: str, digest: str | None = None) -> str:
        """Production goes one step back; ``digest`` (optional) must be the current production."""
        self.services.leader.require(f"roll back {model}")
        with self._lock:
            current = self.registry.pointer(model)
            if current is None:
                raise NotFoundError("production model", model)
            with self.services.store.write() as conn:
                self.services.leader.fence(conn, f"roll back {model}")
                pointer = self.registry.rollback(
                    model, actor, expect=digest, epoch=self.services.leader.epoch
                )
                rolled = self.candidates.promoted_ids(conn, model, current.sha256)
                for cid in rolled:
                    self.candidates.transition(conn, cid, S.PROMOTED, S.ROLLED_BACK, actor)
            self.audit.append(
                AuditEntry(
                    actor,
                    "rolled_back",
                    model,
                    pointer.sha256,
                    ",".join(rolled) or None,
                    current.sha256,
                )
            )
            self.promotions.labels("rolled_back").inc()
        for cid in rolled:
            self.write_report(cid)
        self.services.bus.publish(
            ModelRolledBack(
                model=model, digest=pointer.sha256, rolled_back_from=current.sha256, by=actor
            )
        )
        self._fire("rolled_back", model, pointer.sha256, current.sha256)
        return pointer.sha256

    def _awaiting(self, candidate_id: str, verb: str) -> Candidate:
        cand = self.get(candidate_id)
        if (
            cand.state == S.AWAITING_APPROVAL
            and cand.expires_at
            and cand.expires_at <= self.clock()
        ):
            self._expire(cand)
            cand = self.get(candidate_id)
        if cand.state != S.AWAITING_APPROVAL:
            hint = {
                S.PROMOTED: "it was already promoted; an approval is used once",
                S.EXPIRED: "its approval window (gate.approval_ttl_s) passed; run a new patch",
                S.INCONCLUSIVE: "inconclusive candidates are never promoted",
                S.FAIL: "it failed the gate",
            }.get(cand.state, "only awaiting_approval candidates can be decided")
            by = f" by {cand.decided_by}" if cand.decided_by else ""
            raise ConflictError(
                f"cannot {verb} candidate {candidate_id}: it is {cand.state}{by}; {hint}"
            )
        return cand

    def _expire(self, cand: Candidate) -> None:
        with self._lock:
            try:
                with self.services.store.write() as conn:
                    self.services.leader.fence(conn, f"expire candidate {cand.id}")
                    self.candidates.transition(
                        conn, cand.id, S.AWAITING_APPROVAL, S.EXPIRED, "gate:ttl"
                    )
            except ConflictError:
                return
            self.audit.append(
                AuditEntry(
                    "gate:ttl",
                    "expired",
                    cand.model,
                    cand.digest,
                    cand.id,
                    metrics=audit_metrics(cand.gate),
                )
            )
            self.promotions.labels("expired").inc()
        self.write_report(cand.id)

    def _fire(self, event: str, model: str, digest: str, previous: str | None) -> None:
        weights = self.registry.version_dir(model, digest) / "model.safetensors"
        self.hooks.fire(HookEvent(event, model, digest, previous, weights))

    # -- housekeeping --------------------------------------------------------------------------
    def tick(self) -> None:
        """Expire overdue approvals; garbage-collect old registry versions."""
        now = self.clock()
        for cand in self.list(state=S.AWAITING_APPROVAL, limit=10_000):
            if cand.expires_at is not None and cand.expires_at <= now:
                self._expire(cand)
        keep = self.services.config.registry.keep_versions
        scoped = self.services.scoped_model
        for model in [scoped] if scoped else self.registry.models():
            pending = {c.digest for s in PENDING for c in self.list(model, s, limit=10_000)}
            self.registry.gc(model, keep, protect=frozenset(pending))

    def reconcile(self) -> None:
        """After a crash: a pointer switched without its commit, or an evaluation cut short."""
        for cand in self.list(state=S.AWAITING_APPROVAL, limit=10_000):
            pointer = self.registry.pointer(cand.model)
            if pointer and pointer.sha256 == cand.digest and pointer.action == "promote":
                with self._lock, self.services.store.write() as conn:
                    self.services.leader.fence(conn, f"reconcile candidate {cand.id}")
                    self.candidates.transition(
                        conn,
                        cand.id,
                        S.AWAITING_APPROVAL,
                        S.PROMOTED,
                        pointer.approved_by,
                        "reconciled after restart",
                    )
                self.audit.append(
                    AuditEntry(
                        pointer.approved_by,
                        "promoted",
                        cand.model,
                        cand.digest,
                        cand.id,
                        pointer.previous,
                        detail="reconciled after restart",
                    )
                )
        for cand in self.list(state=S.EVALUATING, limit=10_000):
            try:
                self.evaluate_run(cand.run_id, cand.model)
            except PatchdError as err:
                log.error("re-evaluating candidate %s failed: %s", cand.id, err)


__all__ = [
    "PENDING",
    "STATES",
    "Candidate",
    "CandidateState",
    "CandidatesComponent",
    "RunInputs",
    "Verdict",
]

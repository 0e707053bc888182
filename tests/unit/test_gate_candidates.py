"""Candidate lifecycle in-process: real Store, real registry, real audit log, threads."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry, generate_latest

from patchd.domain import CandidateEvaluated, EventBus, ModelPromoted, ModelRolledBack, RunFinished
from patchd.exceptions import ConflictError, NotFoundError
from patchd.promotion.component import CandidatesComponent
from patchd.services import Services
from patchd.store.backend import open_store
from tests.gate_support import (
    evaluation,
    failing,
    fake_run,
    make_config,
    passing,
    png_bytes,
    write_weights,
)


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def make(tmp_path: Path, backend_store_config: dict[str, object]) -> Iterator:
    """Candidates components on each store backend in turn (tests/conftest.py)."""
    built: list[Services] = []

    def build(clock: FakeClock | None = None, **gate: object) -> CandidatesComponent:
        config = make_config(tmp_path, store=backend_store_config, **gate)
        services = Services(
            config,
            open_store(config),
            EventBus(),
            CollectorRegistry(),
            BackgroundScheduler(),
            "redis://unused",
        )
        if clock is not None:
            services.clock = clock
        built.append(services)
        comp = CandidatesComponent(services)
        for collector in comp.collectors():
            services.metrics.register(collector)
        comp.start()
        return comp

    yield build
    for services in built:
        services.store.close()


def _incumbent(comp: CandidatesComponent, tmp: Path) -> str:
    path = tmp / "incumbent.safetensors"
    write_weights(path, 100.0)
    return comp.registry.import_model("m", path, "setup").sha256


def test_pass_then_approve_promotes_once(make, tmp_path: Path) -> None:
    comp = make()
    events: list[object] = []
    comp.services.bus.subscribe(CandidateEvaluated, events.append)
    comp.services.bus.subscribe(ModelPromoted, events.append)
    parent = _incumbent(comp, tmp_path)
    sha = fake_run(comp.services.config.artifacts_root, "r1", passing(), 1.0, png_bytes())
    comp.services.bus.publish(RunFinished(run_id="r1", model="m", result="succeeded"))
    cand = comp.get("c-r1")
    assert (cand.state, cand.verdict, cand.digest, cand.parent) == (
        "awaiting_approval",
        "pass",
        sha,
        parent,
    )
    version = comp.registry.get("m", sha)
    assert {"report.json", "report.html"} <= set(version.manifest.files)
    assert version.manifest.gate["verdict"] == "pass" and version.manifest.parent == parent
    done = comp.approve("c-r1", sha, "alice")
    assert done.state == "promoted" and done.decided_by == "alice"
    assert comp.registry.production("m").sha256 == sha
    assert [type(e).__name__ for e in events] == ["CandidateEvaluated", "ModelPromoted"]
    with pytest.raises(ConflictError, match="already promoted"):
        comp.approve("c-r1", sha, "alice")  # replay
    actions = [(e.action, e.actor) for e in comp.audit.read()]
    assert actions == [("evaluated", "gate"), ("promoted", "alice")]
    assert comp.audit.read()[1].metrics["worst_group_after"] == pytest.approx(0.80)
    assert "state <b>promoted</b>" in (version.path / "report.html").read_text()  # rewritten


def test_fail_and_inconclusive_are_final(make) -> None:
    comp = make()
    root = comp.services.config.artifacts_root
    fake_run(root, "bad", failing(), 2.0)
    fake_run(
        root,
        "small",
        evaluation([200, 5, 200, 200], [0.9, 0.3, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]),
        3.0,
    )
    assert comp.evaluate_run("bad", "m").state == "fail"
    small = comp.evaluate_run("small", "m")
    assert small.state == "inconclusive"
    with pytest.raises(ConflictError, match="never promoted"):
        comp.approve("c-small", small.digest, "alice")
    assert comp.registry.pointer("m") is None
    assert comp.evaluate_run("small", "m") == comp.get("c-small")  # idempotent per run


def test_stale_unknown_digest_and_expiry(make, tmp_path: Path) -> None:
    clock = FakeClock()
    comp = make(clock, approval_ttl_s=30)
    _incumbent(comp, tmp_path)
    sha = fake_run(comp.services.config.artifacts_root, "r1", passing(), 1.0)
    comp.evaluate_run("r1", "m")
    with pytest.raises(ConflictError, match="stale"):
        comp.approve("c-r1", "0" * 64, "alice")
    with pytest.raises(NotFoundError):
        comp.approve("c-nope", sha, "alice")
    clock.advance(29)
    assert comp.get("c-r1").state == "awaiting_approval"
    clock.advance(2)
    with pytest.raises(ConflictError, match="expired"):
        comp.approve("c-r1", sha, "alice")
    assert comp.get("c-r1").state == "expired"
    assert [e.action for e in comp.audit.read()] == ["evaluated", "expired"]


def test_expiry_job_and_metrics(make, tmp_path: Path) -> None:
    clock = FakeClock()
    comp = make(clock, approval_ttl_s=30)
    fake_run(comp.services.config.artifacts_root, "r1", passing(), 1.0)
    comp.evaluate_run("r1", "m")
    text = generate_latest(comp.services.metrics).decode()
    assert 'patchd_candidates{state="awaiting_approval"} 1.0' in text
    assert "patchd_awaiting_approval_seconds" in text
    clock.advance(10)
    comp.tick()
    assert comp.get("c-r1").state == "awaiting_approval"
    assert (
        "patchd_awaiting_approval_seconds 10.0" in generate_latest(comp.services.metrics).decode()
    )
    clock.advance(21)
    comp.tick()
    assert comp.get("c-r1").state == "expired"
    text = generate_latest(comp.services.metrics).decode()
    assert 'patchd_candidates{state="expired"} 1.0' in text
    assert 'patchd_promotions_total{result="expired"} 1.0' in text


def test_parent_changed_makes_candidate_stale(make, tmp_path: Path) -> None:
    comp = make()
    _incumbent(comp, tmp_path)
    root = comp.services.config.artifacts_root
    a = fake_run(root, "ra", passing(), 1.0)
    b = fake_run(root, "rb", passing(), 2.0)
    comp.evaluate_run("ra", "m")
    comp.evaluate_run("rb", "m")
    comp.approve("c-ra", a, "alice")
    with pytest.raises(ConflictError, match="evidence is stale"):
        comp.approve("c-rb", b, "alice")


def test_rollback_and_auto_promote(make, tmp_path: Path) -> None:
    comp = make(auto_promote=True)
    rolled: list[ModelRolledBack] = []
    comp.services.bus.subscribe(ModelRolledBack, rolled.append)
    parent = _incumbent(comp, tmp_path)
    sha = fake_run(comp.services.config.artifacts_root, "r1", passing(), 1.0)
    assert comp.evaluate_run("r1", "m").state == "promoted"
    assert comp.registry.pointer("m").approved_by == "gate:auto_promote"
    assert comp.rollback("m", "bob", digest=sha) == parent
    assert comp.get("c-r1").state == "rolled_back"
    assert rolled[0].rolled_back_from == sha
    with pytest.raises(ConflictError, match="no previous"):
        comp.rollback("m", "bob")
    assert [e.action for e in comp.audit.read()] == ["evaluated", "promoted", "rolled_back"]


def test_concurrent_approve_reject_rollback_one_outcome(make, tmp_path: Path) -> None:
    comp = make()
    _incumbent(comp, tmp_path)
    sha = fake_run(comp.services.config.artifacts_root, "r1", passing(), 1.0)
    comp.evaluate_run("r1", "m")
    barrier = threading.Barrier(24)
    results: list[tuple[str, str]] = []

    def act(kind: str, i: int) -> None:
        barrier.wait()
        try:
            if kind == "approve":
                comp.approve("c-r1", sha, f"a{i}")
            elif kind == "reject":
                comp.reject("c-r1", f"r{i}", "no")
            else:
                comp.rollback("m", f"b{i}", digest=sha)
            results.append((kind, "ok"))
        except ConflictError:
            results.append((kind, "conflict"))

    threads = [
        threading.Thread(target=act, args=(k, i))
        for i in range(8)
        for k in ("approve", "reject", "rollback")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wins = [k for k, r in results if r == "ok"]
    decisions = [e for e in comp.audit.read() if e.action != "evaluated"]
    assert len(results) == 24
    # exactly one of approve/reject; a rollback of the candidate only after it was promoted
    assert wins.count("approve") + wins.count("reject") == 1
    assert wins.count("rollback") <= wins.count("approve")
    assert len(decisions) == len(wins)
    final = comp.get("c-r1").state
    expected = {"reject": "rejected", "approve": "promoted"}[wins[0]]
    assert final == ("rolled_back" if "rollback" in wins else expected)


def test_the_approval_comment_is_in_the_audit_log(make, tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from patchd.api.auth import Principal, TokenStore
    from patchd.promotion.api import build_router

    comp = make()
    _incumbent(comp, tmp_path)
    sha = fake_run(comp.services.config.artifacts_root, "r1", passing(), 1.0, png_bytes())
    comp.services.bus.publish(RunFinished(run_id="r1", model="m", result="succeeded"))
    app = FastAPI()
    app.state.tokens = TokenStore([("t" * 32, Principal("alice", frozenset({"approve", "read"})))])
    app.include_router(build_router(comp, "m"))
    comment = "reviewed the bandage group; ok to ship"
    with TestClient(app) as client:
        r = client.post(
            "/v1/candidates/c-r1/approve",
            json={"digest": sha, "comment": comment},
            headers={"Authorization": "Bearer " + "t" * 32},
        )
    assert r.status_code == 200, r.text
    promoted = [e for e in comp.audit.read() if e.action == "promoted"]
    assert [(e.actor, e.detail) for e in promoted] == [("alice", comment)]

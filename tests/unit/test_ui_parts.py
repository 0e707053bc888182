"""The approval pages' small parts: sessions, CSRF and origin checks, stage progress, the
notification bodies, and the wording of a degraded cell."""

from __future__ import annotations

from patchd.api.auth import Principal
from patchd.domain import GroupDegraded
from patchd.monitor.component import degraded_detail
from patchd.notify.message import Notice, generic, slack
from patchd.runs.records import RunRecord
from patchd.ui.session import SessionStore, origin_of, same_origin, tokens_match
from patchd.ui.views import run_view

ALICE = Principal("alice", frozenset({"read", "approve"}))


def test_sessions_expire_and_are_kept_by_hash() -> None:
    store = SessionStore(ttl_s=60)
    sid, session = store.create(ALICE, now=1000.0)
    assert store.get(sid, now=1059.0) == session and session.can_approve
    assert sid not in store._sessions  # only the hash is kept
    assert store.get(sid, now=1060.0) is None and len(store) == 0
    sid, _ = store.create(ALICE, now=0.0)
    store.drop(sid)
    assert store.get(sid, now=1.0) is None and store.get(None) is None


def test_csrf_and_origin_checks() -> None:
    assert tokens_match("abc", "abc") and not tokens_match("abc", "abd")
    assert not tokens_match(None, "abc") and not tokens_match("", "")
    host = {"host": "127.0.0.1:8321"}
    assert same_origin({**host, "origin": "http://127.0.0.1:8321"}, "http")
    assert not same_origin({**host, "origin": "http://127.0.0.1:9999"}, "http")
    assert not same_origin({**host, "origin": "null"}, "http")
    assert not same_origin({**host, "sec-fetch-site": "same-site"}, "http")
    assert same_origin(host, "http")  # no browser headers: the CSRF token decides
    proxied = origin_of("https://patchd.example.org/base")
    assert same_origin({**host, "origin": "https://patchd.example.org"}, "http", proxied)


def _run(state: str, stage: str, times: dict[str, float]) -> RunRecord:
    return RunRecord("r", "m", state, stage, "manual", {}, {}, times, None, None, 0.0, 0.0)


def test_stage_progress() -> None:
    running = run_view(_run("running", "synthesize", {"collect": 1.0, "mine": 2.0}))
    assert [s.status for s in running.steps] == ["done", "done", "running", "pending", "pending"]
    assert running.done == 2
    failed = run_view(_run("failed", "train", {"collect": 1.0, "mine": 2.0, "synthesize": 3.0}))
    assert [s.status for s in failed.steps][3] == "failed"


def test_degraded_wording_names_the_floor() -> None:
    def event(reference: float, reason: str) -> GroupDegraded:
        return GroupDegraded(
            model="m", cls="top", group="g", accuracy=0.0, reference=reference, n=40, reason=reason
        )

    no_ref = degraded_detail(event(0.6, "floor"), 0.6)
    assert "below the accuracy floor 0.600" in no_ref and "vs reference" not in no_ref
    assert "no reference" in no_ref
    with_ref = degraded_detail(event(0.9, "floor"), 0.6)
    assert "floor 0.600" in with_ref and "reference 0.900" in with_ref
    assert "vs reference 0.900" in degraded_detail(event(0.9, "reference"), 0.6)


def test_notification_bodies() -> None:
    from patchd.promotion.component import Candidate, CandidateState

    cand = Candidate(
        "c-r1",
        "m",
        "r1",
        "a" * 64,
        CandidateState.AWAITING_APPROVAL,
        "pass",
        None,
        None,
        2.0,
        1.0,
        1.0,
        None,
        None,
        None,
    )
    notice = Notice("awaiting_approval", cand, "http://h/ui/candidates/c-r1")
    body = generic(notice)
    assert body["event"] == "candidate.awaiting_approval" and body["url"].endswith("/c-r1")
    message = slack(notice)
    assert (
        "awaits approval" in message["text"] and "<http://h/ui/candidates/c-r1|" in message["text"]
    )
    odd = Notice("fail", Candidate(**{**cand.__dict__, "id": "c-<x>&"}), "http://h/x")
    assert "c-&lt;x&gt;&amp;" in slack(odd)["text"]

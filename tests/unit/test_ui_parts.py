"""The approval pages' small parts: sessions, CSRF and origin checks, stage progress, the
notification bodies, the wording of a degraded cell, and the Defuse regions page."""

from __future__ import annotations

from pathlib import Path

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


def test_regions_page_shows_unlabelled_labels_and_who_and_one_form_per_region(
    tmp_path: Path,
) -> None:
    from patchd.runs import regions as store
    from patchd.ui import views
    from patchd.ui.component import _environment
    from patchd.ui.session import Session
    from patchd.ui.views import regions_page
    from tests.ui_support import write_regions

    run = write_regions(tmp_path, "r-1")
    store.set_labels(run, {"1": "invalid"}, "ana (token alice)", ["top", "other"])
    shown = regions_page(run, ("top", "other"))
    assert [r.region for r in shown.regions] == [0, 1]  # heaviest first
    assert shown.regions[0].label is None and shown.regions[0].mix == (("other", 12), ("top", 4))
    assert shown.n_labelled == 1 and shown.people == "ana (token alice)"
    session = Session(ALICE, "csrf-token-x", 1e12, "ana")

    def render(who: Session | None) -> str:
        return (
            _environment()
            .get_template("regions.html")
            .render(
                session=who, flash=None, model_name="m", nav="runs", p=shown, error=None, v=views
            )
        )

    page = render(session)
    assert page.count('name="csrf" value="csrf-token-x"') == 3  # log out + a form per region
    assert 'action="/ui/runs/r-1/regions/0/label"' in page
    assert "unlabelled" in page and "by ana (token alice)" in page
    assert 'src="/ui/runs/r-1/regions/1/grid.png"' in page and "0.50" in page  # spread / real
    anonymous = render(None)
    assert 'name="csrf"' not in anonymous and "Log in" in anonymous
    (run / "train").mkdir()
    shown = regions_page(run, ("top", "other"))
    closed = render(session)
    assert "Labelling is closed" in closed and "/label" not in closed


def test_regions_page_of_a_run_awaiting_labels_has_the_labels_done_button(
    tmp_path: Path,
) -> None:
    from patchd.runs.records import RunRecord
    from patchd.ui import views
    from patchd.ui.component import _environment
    from patchd.ui.session import Session
    from patchd.ui.views import regions_page
    from tests.ui_support import write_regions

    shown = regions_page(write_regions(tmp_path, "r-1"), ("top", "other"))
    labels = {"regions": 2, "since": 1e9, "deadline": 1e9 + 3600}
    paused = RunRecord(
        "r-1", "m", "awaiting_labels", "synthesize", "x", {}, {}, {}, None, {"labels": labels}, 0, 0
    )
    session = Session(ALICE, "csrf-token-x", 1e12, "ana")

    def render(who: Session | None, run: RunRecord) -> str:
        template = _environment().get_template("regions.html")
        ctx = {"flash": None, "model_name": "m", "nav": "runs", "p": shown, "error": None}
        return template.render(session=who, run=run, v=views, **ctx)

    page = render(session, paused)
    done = page.split('action="/ui/runs/r-1/regions/done"')
    assert len(done) == 2 and 'name="csrf" value="csrf-token-x"' in done[1].split("</form>")[0]
    assert "Labels done, train" in page and "awaiting labels" in page
    assert "its 2 regions" in page and views.when(1e9 + 3600) in page
    assert "Labels done" not in render(None, paused)  # anonymous: no form
    resumed = RunRecord(
        **{
            **paused.__dict__,
            "state": "queued",
            "result": {"labels": {**labels, "by": "Ana (token alice)", "at": 1e9 + 60}},
        }
    )
    after = render(session, resumed)
    assert "Labels done" not in after and "Resumed to train by Ana (token alice)" in after

"""The approval pages over real HTTP against a real ``patchd serve``: login, sessions, CSRF and
same-origin refusals, approve / reject / rollback from forms landing in the audit log with the
person's name, read-only tokens, no token in URLs or logs, and the candidate webhooks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from patchd.promotion.audit import AuditLog
from patchd.promotion.registry import Registry
from tests.gate_support import failing, fake_run, passing, png_bytes
from tests.procs import TOKEN
from tests.ui_support import (
    APPROVER_TOKEN,
    READER_TOKEN,
    Receiver,
    UiServe,
    csrf_of,
    login,
    start_ui_serve,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def ui(tmp_path: Path, clean_redis: str) -> Iterator[UiServe]:
    yield from start_ui_serve(tmp_path, clean_redis)


def _candidate(ui: UiServe, run_id: str, seed: float, good: bool = True) -> str:
    digest = fake_run(ui.artifacts, run_id, passing() if good else failing(), seed, png_bytes())
    with ui.serve.client() as admin:
        admin.post("/v1/candidates", json={"run_id": run_id}).raise_for_status()
    return digest


def _browser(ui: UiServe) -> httpx.Client:
    return httpx.Client(base_url=ui.serve.url, timeout=30, follow_redirects=False)


def _wait_hooks(n: int, timeout: float = 10.0) -> list[tuple[str, dict]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(Receiver.received) < n:
        time.sleep(0.05)
    return list(Receiver.received)


def test_login_approve_reject_rollback_over_http(ui: UiServe) -> None:
    d1 = _candidate(ui, "r1", 1.0)
    audit, registry = AuditLog(ui.state / "audit.log"), Registry(ui.state / "registry")
    before = registry.pointer("m").sha256
    with _browser(ui) as browser:
        # without a session every page sends the person to the login form
        page = browser.get("/ui/candidates/c-r1")
        assert page.status_code == 303 and page.headers["location"] == "/ui/login"
        form = browser.get("/ui/login")
        cookie = form.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        assert "script-src 'self'" in form.headers["content-security-policy"]

        wrong = browser.post("/ui/login", data={"token": "x" * 32, "csrf": csrf_of(form.text)})
        assert wrong.status_code == 401 and "not valid" in wrong.text
        no_csrf = browser.post("/ui/login", data={"token": APPROVER_TOKEN})
        assert no_csrf.status_code == 403
        done = login(browser, APPROVER_TOKEN)
        assert done.status_code == 303 and done.headers["location"] == "/ui/candidates"
        assert "patchd_session=" in done.headers["set-cookie"]
        assert "samesite=strict" in done.headers["set-cookie"].lower()

        listed = browser.get("/ui/candidates")
        assert listed.status_code == 200 and "c-r1" in listed.text and "alice" in listed.text
        page = browser.get("/ui/candidates/c-r1")
        assert page.status_code == 200
        assert "Approve and promote" in page.text and f'value="{d1}"' in page.text
        assert "PASS: the patch clears the gate" in page.text  # the report, inline
        csrf = csrf_of(page.text)

        # refused: another origin (with the right token even), no token, a wrong token
        evil = browser.post(
            "/ui/candidates/c-r1/approve",
            data={"digest": d1, "csrf": csrf},
            headers={"Origin": "http://evil.example"},
        )
        assert evil.status_code == 403 and "another origin" in evil.text
        cross = browser.post(
            "/ui/candidates/c-r1/approve",
            data={"digest": d1, "csrf": csrf},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert cross.status_code == 403
        for bad in ({"digest": d1}, {"digest": d1, "csrf": csrf[:-2] + "xx"}):
            assert browser.post("/ui/candidates/c-r1/approve", data=bad).status_code == 403
        stale = browser.post("/ui/candidates/c-r1/approve", data={"digest": "0" * 64, "csrf": csrf})
        assert stale.status_code == 409 and "stale" in stale.text
        assert registry.pointer("m").sha256 == before
        assert not [e for e in audit.read() if e.action in ("approved", "promoted")]

        # approved from the form: production switches, the audit names alice
        ok = browser.post(
            "/ui/candidates/c-r1/approve",
            data={"digest": d1, "csrf": csrf},
            headers={"Origin": ui.serve.url},
        )
        assert (
            ok.status_code == 303 and ok.headers["location"] == "/ui/candidates/c-r1?msg=approved"
        )
        assert registry.pointer("m").sha256 == d1
        assert registry.pointer("m").approved_by == "alice"
        promoted = [e for e in audit.read() if e.candidate == "c-r1" and e.action == "promoted"]
        assert [e.actor for e in promoted] == ["alice"]
        shown = browser.get(ok.headers["location"])
        assert (
            "Approved: production switched" in shown.text
            and "Approve and promote" not in shown.text
        )
        again = browser.post("/ui/candidates/c-r1/approve", data={"digest": d1, "csrf": csrf})
        assert again.status_code == 409 and "used once" in again.text

        # rejected from the form, with the reason recorded
        d2 = _candidate(ui, "r2", 2.0)
        csrf = csrf_of(browser.get("/ui/candidates/c-r2").text)
        no = browser.post(
            "/ui/candidates/c-r2/reject", data={"reason": "looks off on site B", "csrf": csrf}
        )
        assert no.status_code == 303
        rejected = [e for e in audit.read() if e.candidate == "c-r2" and e.action == "rejected"]
        assert [(e.actor, e.detail, e.digest) for e in rejected] == [
            ("alice", "looks off on site B", d2)
        ]

        # production history and rollback
        prod = browser.get("/ui/production")
        assert prod.status_code == 200 and "Roll back to" in prod.text and "alice" in prod.text
        back = browser.post(
            "/ui/production/m/rollback", data={"digest": d1, "csrf": csrf_of(prod.text)}
        )
        assert back.status_code == 303 and registry.pointer("m").sha256 == before
        assert [e.actor for e in audit.read() if e.action == "rolled_back"] == ["alice"]

        # the other pages answer
        assert "Patch runs" in browser.get("/ui/runs").text
        assert "worst-group accuracy" in browser.get("/ui/models").text

        # logging out ends the session
        out = browser.post("/ui/logout", data={"csrf": csrf})
        assert out.status_code == 303
        assert browser.get("/ui/candidates").status_code == 303

    log = ui.serve.log()
    for token in (APPROVER_TOKEN, READER_TOKEN, TOKEN):
        assert token not in log
    assert "ui: alice logged in" in log


def test_read_only_token_sees_but_cannot_decide(ui: UiServe) -> None:
    d1 = _candidate(ui, "r1", 1.0)
    with _browser(ui) as browser:
        assert login(browser, READER_TOKEN).status_code == 303
        page = browser.get("/ui/candidates/c-r1")
        assert page.status_code == 200 and "may read but not approve" in page.text
        assert "Approve and promote" not in page.text
        csrf = csrf_of(page.text)  # the logout form's
        refused = browser.post("/ui/candidates/c-r1/approve", data={"digest": d1, "csrf": csrf})
        assert refused.status_code == 403 and "may read but not approve" in refused.text
    with ui.serve.client() as admin:
        assert admin.get("/v1/candidates/c-r1").json()["state"] == "awaiting_approval"
    # an ingest-only token cannot log in at all (none configured here): an unknown one neither
    with _browser(ui) as browser:
        assert login(browser, "ingest-only-token-0123456789").status_code == 401


def test_webhooks_announce_candidates_with_a_link(ui: UiServe) -> None:
    _candidate(ui, "r1", 1.0)
    _candidate(ui, "r0", 0.5, good=False)
    got = _wait_hooks(3)
    paths = sorted(p for p, _ in got)
    assert paths == ["/generic", "/slack", "/slack"], got  # generic: awaiting only
    generic = next(b for p, b in got if p == "/generic")
    assert generic["event"] == "candidate.awaiting_approval" and generic["verdict"] == "pass"
    assert generic["url"] == f"{ui.serve.url}/ui/candidates/c-r1"
    assert generic["worst_group"]["after"] > generic["worst_group"]["before"]
    assert generic["reasons"] and generic["state"] == "awaiting_approval"
    slack = [b for p, b in got if p == "/slack"]
    texts = sorted(b["text"] for b in slack)
    assert "c-r1" in texts[1] and "awaits approval" in texts[1]
    assert "c-r0" in texts[0] and "failed the gate" in texts[0]
    for b in slack:
        assert b["blocks"][0]["type"] == "section" and "<http://" in b["blocks"][0]["text"]["text"]
    metrics = httpx.get(ui.serve.url + "/metrics").text
    assert 'patchd_notifications_total{format="slack",result="sent"} 2.0' in metrics

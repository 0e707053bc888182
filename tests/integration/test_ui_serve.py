"""The approval pages over real HTTP against a real ``patchd serve``: login, sessions, CSRF and
same-origin refusals, approve / reject / rollback from forms landing in the audit log with the
person's name, labelling a run's Defuse regions (what ``patchd regions RUN`` then shows),
read-only tokens, no token in URLs or logs, and the candidate webhooks."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from patchd.promotion.audit import AuditLog
from patchd.promotion.registry import Registry
from tests.gate_support import failing, fake_run, passing, png_bytes
from tests.procs import PATCHD, TOKEN
from tests.ui_support import (
    APPROVER_TOKEN,
    READER_TOKEN,
    Receiver,
    UiServe,
    csrf_of,
    login,
    start_ui_serve,
    write_regions,
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


def test_label_defuse_regions_over_http(ui: UiServe) -> None:
    _candidate(ui, "r1", 1.0)
    write_regions(ui.artifacts, "r1")  # trained already: past labelling
    run = write_regions(ui.artifacts, "r-d")  # synthesized, not trained yet
    (ui.artifacts / "runs" / "r-bare").mkdir()
    with _browser(ui) as browser:
        for url in ("/ui/runs/r-d/regions", "/ui/runs/r-d/regions/0/grid.png"):
            page = browser.get(url)
            assert page.status_code == 303 and page.headers["location"] == "/ui/login"
        form = browser.get("/ui/login")
        named = {"token": APPROVER_TOKEN, "name": "Ana Lee", "csrf": csrf_of(form.text)}
        assert browser.post("/ui/login", data=named).status_code == 303

        cand = browser.get("/ui/candidates/c-r1")
        assert 'href="/ui/runs/r1/regions"' in cand.text
        page = browser.get("/ui/runs/r-d/regions")
        assert page.status_code == 200 and "0 of 2 regions labelled" in page.text
        assert page.text.count('class="tag warn">unlabelled') == 2
        assert (
            "other ×12, top ×4" in page.text
            and 'action="/ui/runs/r-d/regions/0/label"' in page.text
        )
        grid = browser.get("/ui/runs/r-d/regions/1/grid.png")
        assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
        assert grid.content == (run / "synthesize" / "previews" / "region_1.png").read_bytes()
        assert browser.get("/ui/runs/r-d/regions/9/grid.png").status_code == 404
        assert browser.get("/ui/runs/.r-d/regions").status_code == 400
        csrf = csrf_of(page.text)

        # refused: another origin, no or a wrong CSRF token, no session
        url = "/ui/runs/r-d/regions/0/label"
        evil = browser.post(
            url, data={"label": "top", "csrf": csrf}, headers={"Origin": "http://evil.example"}
        )
        assert evil.status_code == 403 and "another origin" in evil.text
        for bad in ({"label": "top"}, {"label": "top", "csrf": csrf[:-2] + "xx"}):
            assert browser.post(url, data=bad).status_code == 403
        with _browser(ui) as stranger:
            assert stranger.post(url, data={"label": "top", "csrf": csrf}).status_code == 401
        # bad input: an unknown class, region, a run without regions, a run past labelling
        shoe = browser.post(url, data={"label": "shoe", "csrf": csrf})
        assert shoe.status_code == 400 and "class &#39;shoe&#39; is unknown" in shoe.text
        nine = browser.post("/ui/runs/r-d/regions/9/label", data={"label": "top", "csrf": csrf})
        assert nine.status_code == 404 and "regions are [0, 1]" in nine.text
        bare = browser.post("/ui/runs/r-bare/regions/0/label", data={"label": "top", "csrf": csrf})
        assert bare.status_code == 404 and "regions of run" in bare.text
        late = browser.post("/ui/runs/r1/regions/0/label", data={"label": "top", "csrf": csrf})
        assert late.status_code == 409 and "past labelling" in late.text
        assert not (run / "regions" / "labels.json").exists()

        ok = browser.post(
            url, data={"label": "top", "csrf": csrf}, headers={"Origin": ui.serve.url}
        )
        assert ok.status_code == 303
        assert ok.headers["location"] == "/ui/runs/r-d/regions?msg=labelled#region-0"
        bad_one = browser.post(
            "/ui/runs/r-d/regions/1/label", data={"label": "invalid", "csrf": csrf}
        )
        assert bad_one.status_code == 303
        shown = browser.get("/ui/runs/r-d/regions?msg=labelled")
        assert "Label saved" in shown.text and "2 of 2 regions labelled" in shown.text
        assert shown.text.count("by Ana Lee (token alice)") == 3  # header + each region

    # the CLI shows what the page stored, with who gave it
    listed = subprocess.run(
        [PATCHD, "regions", "r-d", "-c", str(ui.config_path)],
        env={**os.environ, "PATCHD_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("|")[1].strip(): line for line in listed.stdout.splitlines() if "|" in line}
    assert "| top (by Ana Lee (token alice)) |" in rows["0"]
    assert "| invalid (by Ana Lee (token alice)) |" in rows["1"]
    assert "unlabelled regions" not in listed.stdout
    stored = json.loads((run / "regions" / "labels.json").read_text())
    assert stored["labels"] == {"0": "top", "1": "invalid"}
    assert stored["given_by"] == {"0": "Ana Lee (token alice)", "1": "Ana Lee (token alice)"}
    assert "labelled run 'r-d' region 0 'top'" in ui.serve.log()


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
        write_regions(ui.artifacts, "r-d")
        regions = browser.get("/ui/runs/r-d/regions")
        assert regions.status_code == 200 and "may read but not label" in regions.text
        assert "/label" not in regions.text
        label = browser.post("/ui/runs/r-d/regions/0/label", data={"label": "top", "csrf": csrf})
        assert label.status_code == 403 and "may read but not approve" in label.text
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

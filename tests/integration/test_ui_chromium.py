"""The approval pages in a real headless Chromium (Debian ``chromium`` over DevTools): log in, see
the pending candidate, approve it (answering the confirm dialog), see production switch and the
audit line; reject another; a forged form from another origin is refused; no token leaks into a
URL, a cookie readable by scripts, or serve's log. Screenshots of the candidate and models pages
are kept when ``KEEP_UI_SCREENSHOTS`` names a folder (docs/ for the README; not a
``PATCHD_*`` name: serve reads those as configuration). A Defuse run's regions are labelled in
the page; ``KEEP_UI_REGIONS_FROM`` may name a real run folder whose six heaviest regions (and
their sample grids) are shown instead of the generated ones, for the README's screenshot."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from patchd.promotion.audit import AuditLog
from patchd.promotion.registry import Registry
from tests.cdp import CHROMIUM, Browser
from tests.gate_support import fake_run, passing, png_bytes
from tests.procs import TOKEN
from tests.ui_support import (
    APPROVER_TOKEN,
    READER_TOKEN,
    UiServe,
    start_ui_serve,
    traffic,
    write_regions,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed"),
]
STEADY = {
    ("top", "red"): 0.93,
    ("top", "green"): 0.9,
    ("other", "red"): 0.92,
    ("other", "green"): 0.9,
}
DROP = {**STEADY, ("top", "green"): 0.3}


@pytest.fixture
def ui(tmp_path: Path, clean_redis: str) -> Iterator[UiServe]:
    yield from start_ui_serve(tmp_path, clean_redis)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "chromium")
    yield b
    b.close()


def _attacker(target: str, digest: str) -> ThreadingHTTPServer:
    """Another origin serving a form that posts an approval to serve (with a guessed CSRF)."""
    page = (
        f'<!doctype html><form id="f" method="post" action="{target}">'
        f'<input name="digest" value="{digest}"><input name="csrf" value="guessed">'
        '<button id="go">win a prize</button></form>'
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _feed(ui: UiServe) -> None:
    with ui.serve.client() as admin:
        for seed, acc, n in ((1, STEADY, 300), (2, DROP, 500)):
            preds, labels = traffic(n, seed, acc)
            admin.post("/v1/predictions", json=preds).raise_for_status()
            admin.post("/v1/labels", json=labels).raise_for_status()
            time.sleep(1.5)  # a few monitor ticks (interval 0.5 s)


def _keep(shot: Path, name: str) -> None:
    keep = os.environ.get("KEEP_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / name)


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_approve_reject_and_a_forged_form_in_chromium(
    ui: UiServe, browser: Browser, tmp_path: Path
) -> None:
    base = ui.serve.url
    registry, audit = Registry(ui.state / "registry"), AuditLog(ui.state / "audit.log")
    incumbent = registry.pointer("m").sha256
    _feed(ui)
    png = png_bytes(320, 96)  # wide synthesized previews: their aspect must survive
    digests = {r: fake_run(ui.artifacts, r, passing(), s, png) for r, s in (("r1", 1), ("r2", 2))}
    d3 = fake_run(ui.artifacts, "r3", passing(), 3.0)
    with ui.serve.client() as admin:
        for run in ("r1", "r2", "r3"):
            admin.post("/v1/candidates", json={"run_id": run}).raise_for_status()

    # log in: the pending candidate's page sends us to the form first
    browser.goto(f"{base}/ui/candidates/c-r1")
    assert browser.url == f"{base}/ui/login"
    browser.js(f"document.querySelector('#token').value = {APPROVER_TOKEN!r}")
    browser.js("document.querySelector('form[action=\"/ui/login\"] button').click()")
    browser.settle()
    assert browser.url == f"{base}/ui/candidates"
    assert "c-r1" in browser.text() and "awaiting approval" in browser.text()
    assert "patchd_session" not in browser.js("document.cookie")  # HttpOnly

    # the models page: the per-cell live table with the degraded cell (before a promotion
    # resets the monitor's window to the new model)
    deadline = time.monotonic() + 30
    while True:
        browser.goto(f"{base}/ui/models")
        if "degraded" in browser.text() or time.monotonic() > deadline:
            break
        time.sleep(1)
    models = browser.text()
    assert "green" in models and "degraded" in models, models
    shot = tmp_path / "models.png"
    browser.screenshot(shot)
    _png_ok(shot)
    _keep(shot, "ui_models.png")

    browser.goto(f"{base}/ui/candidates/c-r1")
    text = browser.text()
    assert "Approve and promote" in text and "PASS: the patch clears the gate" in text
    ratios = browser.js(
        "[...document.querySelectorAll('.gallery.samples img')]"
        ".map(i => [i.naturalWidth / i.naturalHeight, i.width / i.height])"
    )
    assert ratios and all(abs(n - r) < 0.05 for n, r in ratios), ratios
    shot = tmp_path / "candidate.png"
    browser.screenshot(shot)
    _png_ok(shot)
    _keep(shot, "ui_candidate.png")

    # approve: the confirm dialog names the digest; production switches; the audit names alice
    question = browser.click_and_confirm("form.approve button")
    assert digests["r1"][:12] in question
    assert browser.url == f"{base}/ui/candidates/c-r1?msg=approved"
    assert "Approved: production switched" in browser.text() and "promoted" in browser.text()
    assert registry.pointer("m").sha256 == digests["r1"]
    browser.goto(f"{base}/ui/production")
    history = browser.text()
    assert "promoted\talice" in history and digests["r1"][:12] in history
    assert [e.actor for e in audit.read() if e.action == "promoted" and e.candidate == "c-r1"] == [
        "alice"
    ]

    # reject: the reason lands in the audit log; dismissing the dialog sends nothing
    browser.goto(f"{base}/ui/candidates/c-r2")
    browser.js("document.querySelector('#reason').value = 'colours look wrong'")
    browser.click_and_confirm("form.reject button", accept=False)
    assert not [e for e in audit.read() if e.candidate == "c-r2" and e.action == "rejected"]
    browser.click_and_confirm("form.reject button")
    assert "Rejected" in browser.text()
    rejected = [e for e in audit.read() if e.candidate == "c-r2" and e.action == "rejected"]
    assert [(e.actor, e.detail) for e in rejected] == [("alice", "colours look wrong")]

    # a forged approval from another origin, with the session cookie attached: refused
    attacker = _attacker(f"{base}/ui/candidates/c-r3/approve", d3)
    try:
        browser.goto(f"http://127.0.0.1:{attacker.server_port}/")
        browser.js("document.querySelector('#go').click()")
        browser.settle()
        assert "another origin" in browser.text()
    finally:
        attacker.shutdown()
    with ui.serve.client() as admin:
        assert admin.get("/v1/candidates/c-r3").json()["state"] == "awaiting_approval"
    assert registry.pointer("m").sha256 == digests["r1"]

    # no token in any URL the browser asked for, nor in serve's log
    urls = browser.requested_urls()
    assert any("/ui/candidates/c-r1" in u for u in urls)
    log = ui.serve.log()
    for token in (APPROVER_TOKEN, READER_TOKEN, TOKEN):
        assert not [u for u in urls if token in u]
        assert token not in log
    assert incumbent != digests["r1"]
    assert httpx.get(f"{base}/ui/static/ui.js").status_code == 200


def _regions_run(ui: UiServe) -> Path:
    """A synthesized, untrained run ``r-d``: generated regions, or a real run's six heaviest."""
    source = os.environ.get("KEEP_UI_REGIONS_FROM")
    if not source:
        return write_regions(ui.artifacts, "r-d")
    run = ui.artifacts / "runs" / "r-d"
    shutil.copytree(Path(source) / "synthesize", run / "synthesize")
    regions = run / "synthesize" / "regions.json"
    body = json.loads(regions.read_text())
    body["regions"] = sorted(body["regions"], key=lambda r: -r["weight"])[:6]
    regions.write_text(json.dumps(body))
    return run


def test_label_a_defuse_region_in_chromium(ui: UiServe, browser: Browser, tmp_path: Path) -> None:
    base = ui.serve.url
    run = _regions_run(ui)
    first = json.loads((run / "synthesize" / "regions.json").read_text())["regions"][0]
    region = int(first["region"])
    browser.goto(f"{base}/ui/login")
    browser.js(f"document.querySelector('#token').value = {APPROVER_TOKEN!r}")
    browser.js("document.querySelector('form[action=\"/ui/login\"] button').click()")
    browser.settle()
    browser.goto(f"{base}/ui/runs/r-d/regions")
    assert "unlabelled" in browser.text()
    # every grid loads under the page's CSP (img-src 'self'), at its own aspect
    loaded = browser.js(
        "[...document.querySelectorAll('table.regions img')].map(i => i.complete && i.naturalWidth)"
    )
    assert loaded and all(loaded), loaded
    select = f"#label-{region}"
    choice = browser.js(f"[...document.querySelector({select!r}).options].pop().value")
    assert choice == "invalid"
    browser.js(f"document.querySelector({select!r}).value = {choice!r}")
    browser.js(f"document.querySelector('#region-{region} form button').click()")
    browser.settle()
    assert "Label saved" in browser.text() and "by alice" in browser.text()
    stored = json.loads((run / "regions" / "labels.json").read_text())
    assert stored["labels"] == {str(region): choice} and stored["given_by"][str(region)] == "alice"
    browser.js("window.scrollTo(0, 0)")
    shot = tmp_path / "regions.png"
    browser.screenshot(shot)
    _png_ok(shot)
    _keep(shot, "ui_regions.png")

"""Promotion hooks (HTTP with retries, argv command) and the fsynced append-only audit log."""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from prometheus_client import CollectorRegistry

from patchd.config import HookConfig
from patchd.promotion.audit import AuditEntry, AuditLog
from patchd.promotion.hooks import HookEvent, HookRunner

EVENT = HookEvent("promoted", "m", "a" * 64, "b" * 64, Path("/x/model.safetensors"))


class _Flaky(BaseHTTPRequestHandler):
    """Answers 503 twice, then 200."""

    calls: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append(body)
        self.send_response(503 if len(type(self).calls) <= 2 else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _server() -> HTTPServer:
    server = HTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_http_hook_retries_until_success() -> None:
    _Flaky.calls = []
    server = _server()
    url = f"http://127.0.0.1:{server.server_port}/reload"
    metrics = CollectorRegistry()
    runner = HookRunner(HookConfig(reload_urls=[url], retries=3), metrics, backoff_s=0.01)
    assert runner.run(EVENT)
    assert len(_Flaky.calls) == 3 and _Flaky.calls[-1]["digest"] == "a" * 64
    assert metrics.get_sample_value("patchd_hook_failures_total", {"kind": "http"}) is None
    server.shutdown()


def test_failures_are_counted_not_raised(tmp_path: Path) -> None:
    metrics = CollectorRegistry()
    config = HookConfig(
        reload_urls=["http://127.0.0.1:9/unreachable"],
        retries=1,
        command=[sys.executable, "-c", "import sys; sys.exit(3)"],
        timeout_s=2,
    )
    runner = HookRunner(config, metrics, backoff_s=0.01)
    thread = runner.fire(EVENT)
    assert thread is not None
    thread.join(30)
    assert metrics.get_sample_value("patchd_hook_failures_total", {"kind": "http"}) == 1.0
    assert metrics.get_sample_value("patchd_hook_failures_total", {"kind": "command"}) == 1.0


def test_command_gets_digest_in_env_and_no_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATCHD_TOKEN", "secret-secret-secret")
    out = tmp_path / "env.json"
    script = (
        "import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
        "if k.startswith('PATCHD_')}, open(sys.argv[1], 'w'))"
    )
    runner = HookRunner(HookConfig(command=[sys.executable, "-c", script, str(out)]))
    assert runner.run(EVENT)
    env = json.loads(out.read_text())
    assert env["PATCHD_DIGEST"] == "a" * 64 and env["PATCHD_PREVIOUS"] == "b" * 64
    assert env["PATCHD_EVENT"] == "promoted" and "PATCHD_TOKEN" not in env


def test_audit_is_append_only_whole_lines_across_threads_and_processes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append(AuditEntry("alice", "promoted", "m", "a" * 64, "c-1", metrics={"wg": 0.8}))
    first = log.path.read_bytes()
    threads = [
        threading.Thread(target=lambda i=i: log.append(AuditEntry(f"t{i}", "rejected", "m")))
        for i in range(20)
    ]
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:
            try:
                AuditLog(log.path).append(AuditEntry(f"p{i}", "expired", "m", detail="x" * 3000))
            finally:
                os._exit(0)
        pids.append(pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for pid in pids:
        os.waitpid(pid, 0)
    assert log.path.read_bytes().startswith(first)  # never rewritten
    entries = log.read()
    assert len(entries) == 25
    assert entries[0].actor == "alice" and entries[0].metrics == {"wg": 0.8}
    with open(log.path, "ab") as fh:  # a torn last line (power loss mid-write) is skipped
        fh.write(b'{"actor": "torn"')
    assert len(log.read()) == 25

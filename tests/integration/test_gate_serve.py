"""Approvals against a real ``patchd serve``: auth, stale/replayed/expired approvals, races over
HTTP, hooks, and a model server (the serving helper) that hot-reloads after approval."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from patchd.promotion.audit import AuditLog
from patchd.promotion.registry import Registry
from patchd.store.blobs import write_atomic
from tests.gate_support import failing, fake_run, passing, safetensors_bytes, write_weights
from tests.procs import PATCHD, TOKEN, ServeProcess, start_serve, write_config

pytestmark = pytest.mark.integration
READ_TOKEN = "read-only-token-0123456789abcdef"
TTL_S = 8.0


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _tiny() -> Any:
    import torch

    torch.set_num_threads(1)
    module = torch.nn.Module()
    module.linear = torch.nn.Module()
    module.linear.register_parameter("weight", torch.nn.Parameter(torch.zeros(3)))
    return module


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    return subprocess.run(
        [PATCHD, *args, "-c", str(cfg)], env=env, capture_output=True, text=True, timeout=120
    )


def _race(serve: ServeProcess, calls: list[tuple[str, dict[str, Any]]]) -> list[int]:
    barrier = threading.Barrier(len(calls))

    def one(call: tuple[str, dict[str, Any]]) -> int:
        with serve.client() as client:
            barrier.wait()
            return client.post(call[0], json=call[1]).status_code

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


@pytest.fixture
def setup(tmp_path: Path, clean_redis: str):
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    _Hook.received = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READ_TOKEN} read reader\n")
    tokens.chmod(0o600)  # serve refuses a token file others can read
    cfg = write_config(
        tmp_path,
        {
            "redis": {"url": clean_redis, "embedded": "never"},
            "model": {"name": "m"},
            "api": {"token_file": str(tokens)},
            "gate": {"approval_ttl_s": TTL_S},
            "registry": {"hooks": {"reload_urls": [f"http://127.0.0.1:{hook.server_port}/reload"]}},
        },
    )
    incumbent = tmp_path / "incumbent.safetensors"
    write_weights(incumbent, 100.0)
    done = _cli(cfg, "registry", "import", "--weights", str(incumbent))
    assert done.returncode == 0, done.stderr
    serve = start_serve(tmp_path, {}, config_path=cfg)
    yield serve, cfg
    serve.stop()
    hook.shutdown()


@pytest.mark.slow
def test_approval_lifecycle_over_http(setup) -> None:
    serve, cfg = setup
    config = yaml.safe_load(cfg.read_text())
    state = Path(config["state_dir"])
    artifacts, reg = state / "artifacts", Registry(state / "registry")
    incumbent = reg.pointer("m").sha256
    audit = AuditLog(state / "audit.log")
    assert [e.action for e in audit.read()] == ["imported"]

    from patchd.plugins.serving.loader import ProductionModel

    server = ProductionModel(reg.root, "m", _tiny)
    assert server.load().digest == incumbent
    server.start_watching(interval=0.1)

    with serve.client() as admin, serve.client(READ_TOKEN) as reader:
        # a failing run: candidate is final, never promotable
        fake_run(artifacts, "r0", failing(), 0.5)
        assert admin.post("/v1/candidates", json={"run_id": "r0"}).json()["state"] == "fail"

        d1 = fake_run(artifacts, "r1", passing(), 1.0)
        cand = admin.post("/v1/candidates", json={"run_id": "r1"})
        assert cand.status_code == 201 and cand.json()["state"] == "awaiting_approval"
        assert reader.get("/v1/candidates/c-r1").json()["digest"] == d1

        # forged token, missing scope, unknown candidate, stale digest
        with serve.client("forged-token-0123456789abcdef") as forged:
            assert (
                forged.post("/v1/candidates/c-r1/approve", json={"digest": d1}).status_code == 401
            )
        assert reader.post("/v1/candidates/c-r1/approve", json={"digest": d1}).status_code == 403
        assert admin.post("/v1/candidates/c-nope/approve", json={"digest": d1}).status_code == 404
        stale = admin.post("/v1/candidates/c-r1/approve", json={"digest": "0" * 64})
        assert stale.status_code == 409 and "stale" in stale.json()["error"]

        # 6 approves and 6 rejects at once: exactly one wins, recorded once
        calls = [("/v1/candidates/c-r1/approve", {"digest": d1})] * 6
        calls += [("/v1/candidates/c-r1/reject", {"reason": "race"})] * 6
        codes = _race(serve, calls)
        assert sorted(codes) == [200] + [409] * 11, codes
        decisions = [e for e in audit.read() if e.candidate == "c-r1" and e.action != "evaluated"]
        assert len(decisions) == 1
        won = decisions[0].action

        # the model server follows the pointer within a bounded time
        d2 = fake_run(artifacts, "r2", passing(), 2.0)
        admin.post("/v1/candidates", json={"run_id": "r2"}).raise_for_status()
        t0 = time.monotonic()
        done = _cli(cfg, "approve", "c-r2", "--yes")  # the CLI fetches and sends the digest
        t1 = time.monotonic()
        assert done.returncode == 0, done.stderr
        loaded = _wait_for(server, d2)
        swap = server.current.loaded_at - server.current.promoted_at
        print(f"approve CLI took {t1 - t0:.2f}s; pointer switch -> model swapped: {swap:.3f}s")
        assert 0 <= swap < 2.0  # watcher polls every 0.1 s
        assert loaded - t0 < 10.0
        assert server.failures == 0
        replay = admin.post("/v1/candidates/c-r2/approve", json={"digest": d2})
        assert replay.status_code == 409 and "used once" in replay.json()["error"]

        # concurrent rollbacks: one wins, the server follows it back
        previous = reg.pointer("m").previous
        codes = _race(serve, [("/v1/rollback", {"digest": d2})] * 6)
        assert sorted(codes) == [200] + [409] * 5, codes
        _wait_for(server, previous)
        assert reader.get("/v1/candidates/c-r2").json()["state"] == "rolled_back"
        assert [e.action for e in audit.read()].count("rolled_back") == 1

        # the CLI: list, report path, and an expected failure is one line, exit 1
        listed = json.loads(_cli(cfg, "candidates", "--json").stdout)
        assert {c["id"]: c["state"] for c in listed}["c-r2"] == "rolled_back"
        path = Path(_cli(cfg, "report", "c-r2").stdout.strip())
        assert path.name == "report.html" and "rolled_back" in path.read_text()
        again = _cli(cfg, "rollback")
        assert again.returncode == 1 and "no previous" in again.stderr
        assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1

        # an approval after the window closed is rejected
        d3 = fake_run(artifacts, "r3", passing(), 3.0)
        admin.post("/v1/candidates", json={"run_id": "r3"}).raise_for_status()
        time.sleep(TTL_S + 0.5)
        late = admin.post("/v1/candidates/c-r3/approve", json={"digest": d3})
        assert late.status_code == 409 and "expired" in late.json()["error"]

        report = reader.get("/v1/candidates/c-r2/report")
        assert report.status_code == 200 and "rolled_back" in report.text
        metrics = httpx.get(serve.url + "/metrics").text
        assert 'patchd_candidates{model="m",state="expired"} 1.0' in metrics
        assert 'patchd_promotions_total{model="m",result="rolled_back"} 1.0' in metrics
    events = [(h["event"], h["digest"]) for h in _Hook.received]
    assert ("promoted", d2) in events and ("rolled_back", previous) in events
    print(f"race on c-r1 won by: {won}; hooks received: {len(events)}")
    server.stop_watching()


def _wait_for(server: Any, digest: str | None, timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.digest == digest:
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"server still on {server.digest}, expected {digest}")


def test_serving_helper_never_loads_a_partial_file(tmp_path: Path) -> None:
    """A pointer naming a truncated or tampered file is refused; the old model keeps serving."""
    from patchd.plugins.serving.loader import ProductionModel

    reg = Registry(tmp_path / "reg")
    good = tmp_path / "good.safetensors"
    write_weights(good, 1.0)
    old = reg.import_model("m", good, "setup").sha256
    server = ProductionModel(reg.root, "m", _tiny)
    server.load()
    watcher = server.start_watching(interval=0.05)
    # a version dir whose weights are a prefix of the real file (a copy cut short)
    full = safetensors_bytes([7.0, 8.0, 9.0])
    import hashlib

    digest = hashlib.sha256(full).hexdigest()
    vdir = reg.root / "m" / "versions" / digest
    vdir.mkdir(parents=True)
    (vdir / "model.safetensors").write_bytes(full[: len(full) // 2])
    pointer = json.loads(reg.pointer_path("m").read_bytes())
    write_atomic(reg.pointer_path("m"), json.dumps({**pointer, "sha256": digest}).encode())
    deadline = time.monotonic() + 5
    while server.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.failures >= 1 and "sha256" in (server.last_error or "")
    assert server.digest == old
    # the copy completes: the next full check loads it
    (vdir / "model.safetensors").write_bytes(full)
    assert watcher.poll(force=True)
    assert server.digest == digest
    assert server.module.linear.weight.tolist() == [7.0, 8.0, 9.0]
    server.stop_watching()

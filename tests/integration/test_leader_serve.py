"""Two real `patchd serve` replicas on one store and one Redis: exactly one leads; a killed or
paused leader is replaced within seconds, and a resumed stale one reports follower."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.procs import ServeProcess, start_serve, write_config


def _replica(tmp_path: Path, name: str, cfg: dict[str, Any]) -> ServeProcess:
    """A replica with its own config file and port (started one after another: see the docs)."""
    workdir = tmp_path / name
    workdir.mkdir()
    path = write_config(workdir, cfg, port=free_port())
    return start_serve(workdir, cfg, config_path=path)


def _role(serve: ServeProcess) -> dict[str, Any]:
    with serve.client() as c:
        return dict(c.get("/v1/status").json()["leader"])


def _wait_leader(serve: ServeProcess, timeout: float = 10) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if _role(serve)["role"] == "leader":
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"no takeover within {timeout}s: {_role(serve)}\n{serve.log()[-3000:]}")


def test_two_replicas_one_leader_failover_and_pause(tmp_path: Path, clean_redis: str) -> None:
    cfg = {
        "state_dir": str(tmp_path / "state"),  # one store, registry and artifacts for all
        "redis": {"url": clean_redis},
        "leader": {"enabled": True, "ttl_s": 1.5},  # one shared SQLite file: lease on
    }
    first = _replica(tmp_path, "a", cfg)
    second = _replica(tmp_path, "b", cfg)
    third: ServeProcess | None = None
    try:
        assert _role(first)["role"] == "leader" and _role(second)["role"] == "follower"
        assert _role(second)["leader"] == _role(first)["identity"]
        with second.client() as c:  # a follower names the leader in a 503
            body = c.post("/v1/rollback", json={}).json()
            assert body.get("reason") == "not_leader", body
        with first.client() as c:
            assert "patchd_leader{" in c.get("/metrics").text
        epoch1 = _role(first)["epoch"]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        took = _wait_leader(second)
        assert took < 10
        epoch2 = _role(second)["epoch"]
        assert epoch2 > epoch1
        third = _replica(tmp_path, "c", cfg)
        assert _role(third)["role"] == "follower"
        os.kill(second.proc.pid, signal.SIGSTOP)
        time.sleep(2.5)  # past the ttl
        _wait_leader(third)
        os.kill(second.proc.pid, signal.SIGCONT)
        time.sleep(1.0)
        assert _role(second)["role"] == "follower"
        assert _role(third)["epoch"] > epoch2
        assert "fenced" not in third.log()
    finally:
        for proc in (first, second, third):
            if proc is not None:
                if proc.proc.poll() is None:
                    os.kill(proc.proc.pid, signal.SIGCONT)
                proc.stop()

"""Fault test (not part of the pytest run): the leader of two serve replicas SIGKILLed under ingest
load, again and again. Counts acknowledged events lost, duplicate runs/promotions, and the
takeover time of each kill.

    PYTHONPATH=$PWD python -m tests.failover_fault --kills 20
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port
from tests.procs import ServeProcess, start_serve, write_config


def _redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, f"redis://127.0.0.1:{port}/0"


def _replica(root: Path, n: int, cfg: dict[str, Any]) -> ServeProcess:
    workdir = root / f"r{n}"
    workdir.mkdir()
    return start_serve(workdir, cfg, config_path=write_config(workdir, cfg, port=free_port()))


def _role(serve: ServeProcess) -> dict[str, Any]:
    try:
        with serve.client() as c:
            return dict(c.get("/v1/status", timeout=2).json()["leader"])
    except (httpx.HTTPError, ValueError, KeyError):
        return {"role": "down"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ttl", type=float, default=2.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="patchd-failover-"))
    redis_proc, url = _redis(root)
    cfg = {"state_dir": str(root / "state"), "redis": {"url": url}, "leader": {"ttl_s": args.ttl}}
    replicas = [_replica(root, 0, cfg), _replica(root, 1, cfg)]
    acked: list[str] = []
    stop = threading.Event()
    failures = [0]

    def load() -> None:
        batch = 0
        while not stop.is_set():
            ids = [f"b{batch}-{i}" for i in range(200)]
            body = [{"id": i, "pred": 1, "probs": [0.2, 0.8], "groups": {"site": "A"}} for i in ids]
            for serve in list(replicas):
                try:
                    with serve.client() as c:
                        r = c.post("/v1/predictions", json=body, timeout=10)
                    if 200 <= r.status_code < 300:
                        acked.extend(ids)
                        break
                except httpx.HTTPError:
                    failures[0] += 1
            batch += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    takeovers: list[float] = []
    n = 2
    for _ in range(args.kills):
        leader = next((s for s in replicas if _role(s)["role"] == "leader"), None)
        deadline = time.monotonic() + 15
        while leader is None and time.monotonic() < deadline:
            time.sleep(0.1)
            leader = next((s for s in replicas if _role(s)["role"] == "leader"), None)
        assert leader is not None, "no leader"
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait()
        killed = time.monotonic()
        replicas.remove(leader)
        other = replicas[0]
        while _role(other)["role"] != "leader" and time.monotonic() - killed < 30:
            time.sleep(0.05)
        takeovers.append(time.monotonic() - killed)
        replicas.append(_replica(root, n, cfg))
        n += 1
    stop.set()
    thread.join()
    time.sleep(0.5)
    db = sqlite3.connect(root / "state" / "patchd.db")
    stored = {r[0] for r in db.execute("SELECT id FROM predictions")}
    lost = [i for i in acked if i not in stored]
    runs = db.execute("SELECT model, count(*) FROM runs GROUP BY model").fetchall()
    promos = db.execute("SELECT count(*) FROM candidates WHERE state = 'promoted'").fetchone()[0]
    for serve in replicas:
        serve.stop()
    redis_proc.terminate()
    print(
        json.dumps(
            {
                "kills": args.kills,
                "ttl_s": args.ttl,
                "acked_events": len(acked),
                "lost_acked_events": len(lost),
                "post_errors_retried": failures[0],
                "runs_per_model": runs,
                "promoted_candidates": promos,
                "takeover_s": [round(t, 2) for t in takeovers],
                "takeover_max_s": round(max(takeovers), 2),
            }
        )
    )


if __name__ == "__main__":
    main()

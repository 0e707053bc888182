"""Fault test (not part of the pytest run): the leader of two serve replicas SIGKILLed under ingest
load, again and again, on one store (a private PostgreSQL by default). Reports acknowledged events
lost, duplicate runs and promotions, and per kill the time until another replica leads and until
its monitor has ticked.

The load makes runs happen during the kills: every label disagrees with the prediction for group
B, the accuracy floor is above what any cell reaches, so the leader's monitor requests a patch run
whenever ``trigger.min_interval_s`` allows (the runs fail fast: the model has no weights). A run
requested twice for one decision, by an old and a new leader, shows as two runs of the model
closer together than ``min_interval_s``: that is what "duplicate run" counts.

    PYTHONPATH=$PWD python -m tests.failover_fault --kills 20            # Postgres
    PYTHONPATH=$PWD python -m tests.failover_fault --kills 20 --store sqlite
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from patchd.config import build_config
from patchd.store.backend import open_store
from tests.conftest import free_port
from tests.procs import ServeProcess, start_serve, write_config

MIN_INTERVAL_S = 8.0  # trigger.min_interval_s: runs of one model at least this far apart


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
    cfg = {
        **cfg,
        "state_dir": str(workdir / "state") if "url" in cfg["store"] else cfg["state_dir"],
    }
    return start_serve(workdir, cfg, config_path=write_config(workdir, cfg, port=free_port()))


def _get(serve: ServeProcess, path: str) -> dict[str, Any]:
    try:
        with serve.client() as c:
            return dict(c.get(path, timeout=2).json())
    except (httpx.HTTPError, ValueError):
        return {}


def _role(serve: ServeProcess) -> str:
    return str(_get(serve, "/v1/status").get("leader", {}).get("role", "down"))


def _config(root: Path, redis_url: str, store: dict[str, Any], ttl: float) -> dict[str, Any]:
    return {
        "state_dir": str(root / "state"),
        "store": store,
        "redis": {"url": redis_url, "embedded": "never"},
        "leader": {"enabled": True, "ttl_s": ttl},
        "model": {"name": "m", "class_names": ["a", "b"]},
        "groups": {"attributes": ["site"], "values": {"site": ["A", "B"]}},
        "monitor": {
            "interval_s": 0.2, "reference_window": 200, "n_min": 20, "accuracy_floor": 0.99,
            "cooldown_s": 0,
        },
        "trigger": {"min_interval_s": MIN_INTERVAL_S},
    }  # fmt: skip


class Load(threading.Thread):
    """Predictions and their labels in batches of 200, to whichever replica answers."""

    def __init__(self, replicas: list[ServeProcess]) -> None:
        super().__init__(daemon=True)
        self.replicas = replicas
        self.acked: list[str] = []
        self.retried = 0
        self.stop = threading.Event()

    def run(self) -> None:
        batch = 0
        while not self.stop.is_set():
            ids = [f"b{batch}-{i}" for i in range(200)]
            preds = [
                {"id": x, "pred": 1, "probs": [0.2, 0.8], "groups": {"site": "AB"[i % 2]}}
                for i, x in enumerate(ids)
            ]
            labels = [{"id": x, "label": 1 - i % 2} for i, x in enumerate(ids)]  # B: all wrong
            if self._post("/v1/predictions", preds):
                self.acked.extend(ids)
                self._post("/v1/labels", labels)
            batch += 1

    def _post(self, path: str, body: list[dict[str, Any]]) -> bool:
        for serve in list(self.replicas):
            try:
                with serve.client() as c:
                    if 200 <= c.post(path, json=body, timeout=10).status_code < 300:
                        return True
            except httpx.HTTPError:
                self.retried += 1
        return False


def _wait(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate() and time.monotonic() - start < timeout:
        time.sleep(0.05)
    return time.monotonic() - start


def _kill_leader(replicas: list[ServeProcess]) -> tuple[float, float]:
    """SIGKILL the leader; seconds until the other replica leads, and until its monitor ticked."""
    _wait(lambda: any(_role(s) == "leader" for s in replicas), 15)
    leader = next(s for s in replicas if _role(s) == "leader")
    leader.proc.send_signal(signal.SIGKILL)
    leader.proc.wait()
    killed, killed_wall = time.monotonic(), time.time()
    replicas.remove(leader)
    other = replicas[0]
    takeover = _wait(lambda: _role(other) == "leader", 30)
    ticked = _wait(lambda: (_get(other, "/v1/groups").get("ts") or 0) > killed_wall, 30)
    return takeover, time.monotonic() - killed if ticked < 30 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--ttl", type=float, default=2.0)
    ap.add_argument("--store", choices=["postgres", "sqlite"], default="postgres")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="patchd-failover-"))
    redis_proc, redis_url = _redis(root)
    pg = None
    store: dict[str, Any] = {}
    if args.store == "postgres":
        from patchd.store.pg_local import PrivatePostgres

        pg = PrivatePostgres(root / "pg", durable=True).start()
        store = {"url": pg.url}
    cfg = _config(root, redis_url, store, args.ttl)
    replicas = [_replica(root, 0, cfg), _replica(root, 1, cfg)]
    load = Load(replicas)
    load.start()
    takeovers, ticks = [], []
    try:
        for n in range(2, args.kills + 2):
            takeover, tick = _kill_leader(replicas)
            takeovers.append(takeover)
            ticks.append(tick)
            replicas.append(_replica(root, n, cfg))
        load.stop.set()
        load.join()
        time.sleep(1.0)
    finally:
        load.stop.set()
        for serve in replicas:
            serve.stop()
    result = _count(cfg, load, takeovers, ticks, args)
    redis_proc.terminate()
    if pg is not None:
        pg.stop()
    print(json.dumps(result))


def _count(
    cfg: dict[str, Any], load: Load, takeovers: list[float], ticks: list[float], args: Any
) -> dict[str, Any]:
    store = open_store(build_config(cfg, environ={}))
    with store.read() as conn:
        stored = {r[0] for r in conn.execute("SELECT id FROM predictions")}
        created = [r[0] for r in conn.execute("SELECT created_at FROM runs ORDER BY created_at")]
        promoted = conn.execute(
            "SELECT model, count(*) FROM candidates WHERE state = 'promoted' GROUP BY model"
        ).fetchall()
    store.close()
    gaps = [b - a for a, b in zip(created, created[1:], strict=False)]
    return {
        "store": args.store,
        "kills": args.kills,
        "ttl_s": args.ttl,
        "acked_events": len(load.acked),
        "lost_acked_events": sum(1 for i in load.acked if i not in stored),
        "post_errors_retried": load.retried,
        "runs": len(created),
        "duplicate_runs": sum(1 for g in gaps if g < MIN_INTERVAL_S * 0.95),
        "min_run_gap_s": round(min(gaps), 2) if gaps else None,
        "promotions_per_model": [list(r) for r in promoted],
        "takeover_s": [round(t, 2) for t in takeovers],
        "takeover_max_s": round(max(takeovers), 2),
        "first_tick_after_kill_s": [round(t, 2) for t in ticks],
        "first_tick_max_s": round(max(ticks), 2),
    }


if __name__ == "__main__":
    main()

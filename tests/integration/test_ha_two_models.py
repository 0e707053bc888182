"""The replicated setup end to end (issue 16, "must show"): two ``patchd serve`` replicas on one
private PostgreSQL, Redis for the queue and the leader lease, run artifacts and the registry in a
bucket of a real S3-API server process (moto), two models in one daemon, and an RQ worker that
shares no directory with serve.

A patch run for ``digits`` goes through every stage while ``other`` keeps ingesting through the
other replica; every acknowledged ``other`` event is stored, the run's stages are in the bucket
(published manifest last, read back by the worker), and serve keeps no local run directory.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration import pipeline_support as ps
from tests.procs import ServeProcess, _free_port, start_serve, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("collect", "mine", "synthesize", "train", "evaluate")


def _config(
    tmp_path: Path, redis_url: str, store_url: str, bucket: dict[str, Any], weights: Path
) -> dict[str, Any]:
    base = ps.base_config(tmp_path, redis_url, weights)
    model = base.pop("model")
    root = str(bucket["url"])
    return {
        **base,
        "store": {"url": store_url},
        "leader": {"ttl_s": 2},
        "artifacts": {"root": f"{root}/artifacts", "storage_options": bucket["storage_options"]},
        "registry": {"root": f"{root}/registry", "storage_options": bucket["storage_options"]},
        "model": {k: v for k, v in model.items() if k != "name"},
        "models": [{"name": "digits"}, {"name": "other"}],
    }


def _replica(tmp_path: Path, name: str, config: dict[str, Any]) -> ServeProcess:
    home = tmp_path / name
    home.mkdir()
    overrides = {**config, "state_dir": str(home / "state"), "api": {"port": _free_port()}}
    return start_serve(home, {}, config_path=write_config(home, overrides))


def _leader(replicas: list[ServeProcess], timeout: float = 30) -> ServeProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for replica in replicas:
            with replica.client() as client:
                if client.get("/v1/status").json()["leader"]["role"] == "leader":
                    return replica
        time.sleep(0.2)
    raise AssertionError("no replica became leader")


class Ingest(threading.Thread):
    """Posts ``other`` predictions in small batches until stopped; counts what was acked."""

    def __init__(self, serve: ServeProcess) -> None:
        super().__init__(daemon=True)
        self.serve = serve
        self.acked = 0
        self.batches_during: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.serve.client() as client:
                i = 0
                while not self.stop.is_set():
                    batch = [
                        {"id": f"o{i + k}", "model": "other", "pred": k % 2,
                         "groups": {"color": "red"}}
                        for k in range(50)
                    ]  # fmt: skip
                    r = client.post("/v1/predictions", json=batch)
                    assert r.status_code in (200, 202), r.text
                    self.acked += r.json()["accepted"]
                    self.batches_during.append(time.monotonic())
                    i += 50
                    time.sleep(0.05)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            self.error = err


def test_a_patch_run_for_one_model_while_the_other_ingests_on_postgres_and_a_bucket(
    tmp_path: Path,
    clean_redis: str,
    postgres_url: str,
    s3_bucket: dict[str, Any],
) -> None:
    import s3fs

    weights = tmp_path / "incumbent.safetensors"
    ps.make_incumbent(weights, epochs=3)
    config = _config(tmp_path, clean_redis, postgres_url, s3_bucket, weights)
    replicas = [_replica(tmp_path, "a", config), _replica(tmp_path, "b", config)]
    worker_home = tmp_path / "worker"
    worker_home.mkdir()
    worker_config = write_config(worker_home, {**config, "state_dir": str(worker_home / "state")})
    worker = ps.worker(worker_config, tmp_path / "worker.log")
    ingest: Ingest | None = None
    try:
        leader = _leader(replicas)
        follower = next(r for r in replicas if r is not leader)
        preds, labels = ps.write_events(tmp_path / "images", 60)
        with leader.client() as client:
            tagged = [{**p, "model": "digits"} for p in preds]
            assert client.post("/v1/predictions", json=tagged).json()["accepted"] == 60
            r = client.post("/v1/labels", json=[{**x, "model": "digits"} for x in labels])
            assert r.json()["rejected"] == []

            ingest = Ingest(follower)
            ingest.start()
            run = client.post("/v1/models/digits/runs", json={"reason": "ha"}).json()
            assert run["model"] == "digits" and run["recipe"]["slice_rows"] == 60, run
            started = time.monotonic()
            done = ps.wait_run(client, run["id"], ("succeeded",), timeout=240)
            finished = time.monotonic()
        ingest.stop.set()
        ingest.join(30)
        assert ingest.error is None, ingest.error
        # the other model kept ingesting, through the follower, the whole time the run ran
        during = [t for t in ingest.batches_during if started <= t <= finished]
        assert len(during) >= 10 and ingest.acked > 0
        assert set(done["stage_times"]) == set(STAGES) and done["error"] is None
        _check_counts(leader, follower, ingest.acked)
        _check_bucket(s3fs, s3_bucket, run["id"], replicas)
        with leader.client() as client:
            others = client.get("/v1/models/other/runs").json()["runs"]
            assert others == [] or all(r["model"] == "other" for r in others)
    finally:
        if ingest is not None:
            ingest.stop.set()
        ps.stop_worker(worker)
        for replica in replicas:
            replica.stop()


def _check_counts(leader: ServeProcess, follower: ServeProcess, acked: int) -> None:
    """Every acknowledged ``other`` event is in the shared store, seen by both replicas."""
    for replica in (leader, follower):
        with replica.client() as client:
            deadline = time.monotonic() + 20
            while True:
                models = client.get("/v1/status").json()["models"]
                if models["other"]["predictions"] == acked or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert models["other"]["predictions"] == acked
            assert models["digits"]["labeled"] == 60


def _check_bucket(
    s3fs: Any, bucket: dict[str, Any], run_id: str, replicas: list[ServeProcess]
) -> None:
    """Each stage's files and manifest are in the bucket; serve holds no run directory."""
    options = bucket["storage_options"]
    fs = s3fs.S3FileSystem(endpoint_url=options["endpoint_url"], key="testing", secret="testing")
    root = str(bucket["url"]).removeprefix("s3://")
    for stage in STAGES:
        listed = {Path(p).name for p in fs.ls(f"{root}/artifacts/runs/{run_id}/{stage}")}
        assert "manifest.json" in listed and len(listed) > 1, (stage, listed)
    for replica in replicas:
        assert not (replica.state_dir / "artifacts" / "runs" / run_id).exists()

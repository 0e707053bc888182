"""A patch run with the artifacts and the registry in a bucket on a real S3-API server (moto's
standalone server, a process): real Redis, real `patchd serve`, a real `patchd worker` whose
config names other cache directories than serve's, so nothing reaches the worker but the bucket.

- the incumbent is imported into the bucket registry; the worker fetches it from there;
- every stage is published to the bucket (files, then the manifest) and the next stage's job
  reads its inputs from the bucket into the worker's cache, each file checked;
- serve's gate reads the train and evaluate outputs from the bucket and publishes the candidate
  version to the bucket registry; serve never fetched the training tensors it does not need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from patchd.config import build_config
from patchd.promotion.registry import open_registry
from patchd.runs import jobqueue
from patchd.runs.artifacts import RunArtifacts
from tests.integration import pipeline_support as ps
from tests.procs import start_serve, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _buckets(s3: dict[str, Any], cache: Path) -> dict[str, Any]:
    options = s3["storage_options"]
    return {
        "artifacts": {
            "root": f"{s3['url']}/artifacts",
            "cache_dir": str(cache / "artifacts"),
            "storage_options": options,
        },
        "registry": {
            "root": f"{s3['url']}/registry",
            "cache_dir": str(cache / "registry"),
            "storage_options": options,
        },
    }


def test_a_run_reads_and_writes_its_artifacts_and_models_only_through_the_bucket(
    tmp_path: Path, clean_redis: str, s3_bucket: dict[str, Any]
) -> None:
    incumbent = tmp_path / "incumbent.safetensors"
    ps.make_incumbent(incumbent, epochs=2)
    serve_cfg = {
        **ps.base_config(tmp_path, clean_redis, incumbent),
        **_buckets(s3_bucket, tmp_path / "serve-cache"),
    }
    serve_cfg["model"] = {k: v for k, v in serve_cfg["model"].items() if k != "weights"}
    config_path = write_config(tmp_path, serve_cfg)
    config = build_config(serve_cfg)
    imported = open_registry(config).import_model("digits", incumbent, "setup")
    incumbent.unlink()  # from now on the model exists only in the bucket

    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    worker_cfg = {**serve_cfg, **_buckets(s3_bucket, worker_dir / "cache")}
    worker_cfg["state_dir"] = str(worker_dir / "state")
    worker_path = write_config(worker_dir, worker_cfg)
    worker = ps.worker(worker_path, tmp_path / "worker.log")
    serve = start_serve(tmp_path, {}, config_path=config_path)
    client = serve.client()
    try:
        preds, labels = ps.write_events(tmp_path / "images", 40)
        assert client.post("/v1/predictions", json=preds).json()["accepted"] == 40
        assert client.post("/v1/labels", json=labels).json()["rejected"] == []
        run = client.post("/v1/runs", json={"reason": "bucket"}).json()
        assert run["recipe"]["incumbent_source"] == "registry", run
        done = ps.wait_run(client, run["id"], ("succeeded", "no_improvement"), timeout=180)
        cand = client.post("/v1/candidates", json={"run_id": run["id"]})
        assert cand.status_code in (200, 201, 409), cand.text  # 409: the tick gated it first
        candidates = client.get("/v1/candidates").json()
    finally:
        ps.stop_worker(worker)
        serve.stop()
    log = (tmp_path / "worker.log").read_text()
    assert done["error"] is None, log[-3000:]

    bucket = RunArtifacts.from_config(config)
    assert bucket.blobs is not None
    for stage in jobqueue.STAGES:  # published, and what was published verifies
        manifest = bucket.manifest(run["id"], stage)
        assert manifest is not None, stage
    keys = bucket.blobs.list(f"runs/{run['id']}")
    assert f"runs/{run['id']}/slice.jsonl" in keys

    worker_run = worker_dir / "cache" / "artifacts" / "runs" / run["id"]
    assert (worker_run / "collect" / "train.safetensors").is_file()  # built by the worker
    weights = worker_dir / "cache" / "registry" / "digits" / "versions" / imported.sha256
    assert (weights / "model.safetensors").is_file()  # fetched from the bucket registry
    serve_run = tmp_path / "serve-cache" / "artifacts" / "runs" / run["id"]
    assert (serve_run / "train" / "model.safetensors").is_file()  # fetched by the gate
    assert not (serve_run / "collect" / "train.safetensors").exists()  # never needed by serve
    assert "read ['collect'" in log  # the mine job read collect's output from the bucket

    digests = {c["digest"] for c in _items(candidates) if c["run_id"] == run["id"]}
    assert len(digests) == 1
    registry = open_registry(build_config(_buckets(s3_bucket, tmp_path / "reader")))
    version = registry.get("digits", digests.pop())  # a third machine reads it from the bucket
    version.verify()
    assert version.manifest.run_id == run["id"]
    assert version.manifest.parent == imported.sha256
    evaluation = json.loads((serve_run / "evaluate" / "evaluation.json").read_text())
    assert evaluation["cell"]


def _items(body: Any) -> list[dict[str, Any]]:
    return list(body["candidates"] if isinstance(body, dict) else body)

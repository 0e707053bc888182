"""A patch run end to end: real Redis, real `patchd serve`, real `patchd worker` processes.

- a run on colored-digits passes every stage (svm miner, no augmenter, ERM, 1 epoch) and
  finishes; an empty production slice fails the run with a clear error first;
- re-running a finished stage (or re-enqueueing the run) is a no-op;
- SIGKILL of the whole worker mid-stage, then a new worker: the run finishes with exactly one
  verified output per stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from rq import Queue

from patchd.runs import jobqueue
from patchd.workers import artifacts
from tests.integration import pipeline_support as ps
from tests.procs import PATCHD, TOKEN, ServeProcess, start_serve, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def incumbent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("incumbent") / "incumbent.safetensors"
    ps.make_incumbent(path, epochs=3)
    return path


def _ingest(client: httpx.Client, tmp_path: Path, n: int) -> None:
    preds, labels = ps.write_events(tmp_path / "images", n)
    assert client.post("/v1/predictions", json=preds).json()["accepted"] == n
    assert client.post("/v1/labels", json=labels).json()["rejected"] == []


def _run_dirs(serve: ServeProcess, run_id: str) -> Path:
    return serve.state_dir / "artifacts" / "runs" / run_id


def _assert_clean_outputs(run_dir: Path) -> dict[str, artifacts.StageManifest]:
    names = sorted(p.name for p in run_dir.iterdir())
    assert names == sorted([*jobqueue.STAGES, "slice.jsonl"]), names  # no .tmp-*, no .bad-*
    return {s: artifacts.verify(run_dir / s) for s in jobqueue.STAGES}


def _metric(client: httpx.Client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_run_passes_every_stage_and_reruns_are_noops(
    tmp_path: Path, clean_redis: str, incumbent: Path
) -> None:
    config_path = write_config(tmp_path, ps.base_config(tmp_path, clean_redis, incumbent))
    worker = ps.worker(config_path, tmp_path / "worker.log")  # starts while serve starts
    serve = start_serve(tmp_path, {}, config_path=config_path)
    client = serve.client()
    try:
        empty = client.post("/v1/runs", json={"reason": "empty slice"}).json()
        failed = ps.wait_run(client, empty["id"], ("failed",))
        assert failed["stage"] == "collect"
        assert (
            "production slice" in failed["error"] and "no usable labeled events" in failed["error"]
        )
        assert "data.use_production_slice: false" in failed["error"]

        _ingest(client, tmp_path, 60)
        _cancel_while_running(client, clean_redis)  # the worker must survive the stop
        run = client.post("/v1/runs", json={"reason": "integration"}).json()
        assert run["state"] == "queued" and run["recipe"]["slice_rows"] == 60
        done = ps.wait_run(client, run["id"], ("succeeded",), timeout=120)
        print("stage seconds (happy path):", done["stage_times"])
    finally:
        ps.stop_worker(worker)
    try:
        assert set(done["stage_times"]) == set(jobqueue.STAGES) and done["error"] is None
        manifests = _assert_clean_outputs(_run_dirs(serve, run["id"]))
        collect = manifests["collect"].result
        assert collect["slice_used"] == 60 and collect["n_train"] > 60
        assert {"mining.json", "groups.safetensors", "failure_report.png"} <= set(
            manifests["mine"].files
        )
        assert set(manifests["train"].files) == {"model.safetensors", "history.json"}
        evaluation = json.loads(
            (_run_dirs(serve, run["id"]) / "evaluate" / "evaluation.json").read_text()
        )
        assert (
            len(evaluation["cell"]) == done["result"]["result"]["n_heldout"] == collect["n_heldout"]
        )
        assert done["result"]["result"]["candidate_sha256"] == manifests["train"].result["sha256"]
        assert _metric(client, 'patchd_runs_total{model="digits",result="succeeded"}') == 1
        assert _metric(client, 'patchd_runs_total{model="digits",result="failed"}') == 1
        assert _metric(client, 'patchd_runs_total{model="digits",result="cancelled"}') == 1
        _check_cli(serve, run["id"])
        assert _metric(client, 'patchd_run_stage_seconds_count{model="digits",stage="train"}') == 1
        _assert_rerun_is_noop(serve, done, clean_redis)
    finally:
        serve.stop()


def _cancel_while_running(client: httpx.Client, redis_url: str) -> None:
    run = client.post("/v1/runs", json={"reason": "to cancel"}).json()
    _wait_started(client, run["id"], "mine", need_progress=False)
    cancelled = client.post(f"/v1/runs/{run['id']}/cancel").json()
    assert cancelled["state"] == "cancelled" and cancelled["error"] == "cancelled by request"
    conn = jobqueue.connect(redis_url)
    deadline = time.monotonic() + 30
    while jobqueue.job_state(conn, run["job_ids"]["mine"]).status != "stopped":
        assert time.monotonic() < deadline, "the running mine job was not stopped"
        time.sleep(0.2)
    later = {jobqueue.job_state(conn, run["job_ids"][s]).status for s in jobqueue.STAGES[2:]}
    assert later == {"canceled"}
    assert client.post(f"/v1/runs/{run['id']}/cancel").status_code == 409


def _check_cli(serve: ServeProcess, run_id: str) -> None:
    env = {**serve.env}
    listed = subprocess.run(
        [ps.PATCHD, "runs", "-c", str(serve.config_path), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert run_id in [r["id"] for r in json.loads(listed.stdout)]
    refused = subprocess.run(
        [ps.PATCHD, "runs", "-c", str(serve.config_path), "cancel", run_id],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "HTTP 409" in refused.stderr and "succeeded" in refused.stderr


def _assert_rerun_is_noop(serve: ServeProcess, run: dict[str, Any], redis_url: str) -> None:
    from patchd.config import load_config
    from patchd.workers import jobs

    config = load_config(serve.config_path, {})
    conn = jobqueue.connect(redis_url)
    from rq.job import Job

    recipe_json: str = Job.fetch(run["job_ids"]["train"], connection=conn).args[2]
    before = sorted(conn.keys("rq:job:*"))
    assert (
        jobqueue.enqueue_run(conn, config, run["id"], str(config.artifacts_root), recipe_json)
        == run["job_ids"]
    )
    assert sorted(conn.keys("rq:job:*")) == before and Queue("patchd", connection=conn).count == 0
    model = _run_dirs(serve, run["id"]) / "train" / "model.safetensors"
    stat = model.stat()
    again = jobs.train(run["id"], str(config.artifacts_root), recipe_json)
    assert again["reused"] and again["result"]["sha256"] == artifacts.sha256_file(model)
    assert (model.stat().st_ino, model.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def test_worker_sigkill_mid_stage_then_new_worker_finishes(
    tmp_path: Path, clean_redis: str, incumbent: Path
) -> None:
    config_path = write_config(tmp_path, ps.base_config(tmp_path, clean_redis, incumbent))
    first = ps.worker(config_path, tmp_path / "worker1.log")
    serve = start_serve(tmp_path, {}, config_path=config_path)
    client = serve.client()
    second = None
    try:
        _ingest(client, tmp_path, 40)
        run = client.post(
            "/v1/runs", json={"reason": "chaos", "recipe": {"budget": {"epochs": 20}}}
        ).json()
        _wait_started(client, run["id"], "train")
        second = ps.worker(config_path, tmp_path / "worker2.log")  # imports while we kill
        run_dir = _run_dirs(serve, run["id"])
        mine_mtime = (run_dir / "mine" / "manifest.json").stat().st_mtime_ns
        ps.kill_worker_tree(first)
        assert not (run_dir / "train").exists(), "train finished before the kill; raise epochs"
        done = ps.wait_run(client, run["id"], ("succeeded",), timeout=150)
        print("stage seconds (after SIGKILL):", done["stage_times"])
    finally:
        ps.stop_worker(first)
        if second is not None:
            ps.stop_worker(second)
    try:
        manifests = _assert_clean_outputs(run_dir)
        assert (run_dir / "mine" / "manifest.json").stat().st_mtime_ns == mine_mtime
        assert len(list((run_dir / "train").iterdir())) == 3  # model, history, manifest
        assert done["result"]["result"]["candidate_sha256"] == manifests["train"].result["sha256"]
        conn = jobqueue.connect(clean_redis)
        from rq.job import Job

        train_job = Job.fetch(run["job_ids"]["train"], connection=conn)
        assert train_job.retries_left == 1  # one retry was spent on the abandoned attempt
        assert "abandoned" not in (done["error"] or "")
    finally:
        serve.stop()


def _wait_started(
    client: httpx.Client, run_id: str, stage: str, timeout: float = 90, need_progress: bool = True
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        progress = run.get("result") or {}
        if progress.get("stage") == stage and (
            progress.get("progress", 0) > 0 or not need_progress
        ):
            return run  # the stage has run at least one epoch
        assert run["state"] not in ("succeeded", "failed", "cancelled"), run
        time.sleep(0.1)
    raise AssertionError(f"run {run_id} never started {stage}")


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``patchd ARGS -c CONFIG`` as a person types it (80 columns)."""
    env = {**os.environ, "PATCHD_TOKEN": TOKEN, "COLUMNS": "80"}
    argv = [PATCHD, *args, "-c", str(config_path)]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)


def test_a_run_that_finds_no_improvement_keeps_the_incumbent(
    tmp_path: Path, clean_redis: str, incumbent: Path
) -> None:
    # lr 1e-12: no fine-tuning step can change a prediction, so epoch 0 (the incumbent) is kept
    overrides = ps.base_config(
        tmp_path,
        clean_redis,
        incumbent,
        trainer="gdro",  # keeps the best epoch on validation, epoch 0 being the incumbent
        budget={"epochs": 1, "batch_size": 64, "lr": 1e-12},
    )
    config_path = write_config(tmp_path, overrides)
    worker = ps.worker(config_path, tmp_path / "worker.log")
    serve = start_serve(tmp_path, {}, config_path=config_path)
    client = serve.client()
    try:
        _ingest(client, tmp_path, 60)
        waited = _cli(config_path, "patch", "--wait", "--reason", "no improvement")
        assert waited.returncode == 0, (waited.stdout, waited.stderr)
        run = client.get("/v1/runs").json()["runs"][0]
        done = ps.wait_run(client, run["id"], ("succeeded",), timeout=5)
        assert done["outcome"] == "no_improvement", done
        assert "incumbent kept" in done["outcome_message"]
        assert done["disk_bytes"] > 0
        said = f"run {run['id']} succeeded: no improvement found, incumbent kept: "
        assert said + done["outcome_message"] in waited.stdout, waited.stdout
        assert "no candidate was registered" in waited.stdout
        table = _cli(config_path, "runs")
        row = next(line for line in table.stdout.splitlines() if run["id"] in line)
        assert "no improvement" in row and "succeeded" not in row, table.stdout
        shown = _cli(config_path, "runs", "show", run["id"])
        assert f"run {run['id']}: no improvement found, incumbent kept: " in shown.stderr
        assert json.loads(shown.stdout)["outcome"] == "no_improvement"
        time.sleep(2)  # a candidate would be registered on the tick that saw the run finish
        ids = [c["run_id"] for c in client.get("/v1/candidates").json()["candidates"]]
        assert run["id"] not in ids
        assert client.get(f"/v1/candidates/c-{run['id']}").status_code == 404
        assert _metric(client, 'patchd_runs_total{model="digits",result="no_improvement"}') == 1
        assert _metric(client, 'patchd_runs_total{model="digits",result="succeeded"}') == 0
    finally:
        ps.stop_worker(worker)
        serve.stop()

"""Job ids, queues, timeouts, idempotent enqueue, cancel, and how a run reads its jobs."""

from __future__ import annotations

import pytest
from redis import Redis
from rq import Queue
from rq.job import Job

from patchd.config import build_config
from patchd.exceptions import ConfigError, ValidationError
from patchd.runs import jobqueue
from patchd.runs.component import assess
from patchd.runs.jobqueue import JobState


def test_job_ids_are_deterministic_and_rq_safe() -> None:
    assert (
        jobqueue.job_id("skin-20261123T100000-ab12cd", "train")
        == "skin-20261123T100000-ab12cd-train"
    )
    for bad in ("a:b", "a.b", "", "x" * 81, "a b"):
        with pytest.raises(ValidationError):
            jobqueue.job_id(bad, "train")
    with pytest.raises(ValidationError, match="stage 'gate'"):
        jobqueue.job_id("r1", "gate")


def test_queues_and_timeouts_come_from_config() -> None:
    config = build_config(
        {
            "redis": {"queue_prefix": "pd"},
            "patch": {
                "queues": {"train": "pd-gpu", "synthesize": "pd-gpu"},
                "stage_timeout_s": {"train": 60},
            },
        }
    )
    assert jobqueue.queue_name(config, "collect") == "pd"
    assert jobqueue.queue_name(config, "train") == "pd-gpu"
    assert jobqueue.queue_names(config) == ["pd", "pd-gpu"]
    assert jobqueue.stage_timeout(config, "train") == 60
    assert all(jobqueue.stage_timeout(config, s) > 180 for s in jobqueue.STAGES if s != "train")
    with pytest.raises(ConfigError, match=r"unknown stage\(s\) \['trian'\]"):
        jobqueue.check_patch_config(build_config({"patch": {"queues": {"trian": "x"}}}))


def test_enqueue_chain_is_idempotent(clean_redis: str) -> None:
    conn = jobqueue.connect(clean_redis)
    config = build_config({"redis": {"url": clean_redis}, "patch": {"retries": 2}})
    ids = jobqueue.enqueue_run(conn, config, "r1", "/art", "{}")
    assert ids == {s: f"r1-{s}" for s in jobqueue.STAGES}
    queue = Queue("patchd", connection=conn)
    assert queue.job_ids == ["r1-collect"]  # the rest wait on their dependency
    mine = Job.fetch("r1-mine", connection=conn)
    assert mine.dependency_ids == ["r1-collect"] and mine.get_status().value == "deferred"
    assert mine.timeout == jobqueue.DEFAULT_TIMEOUTS["mine"] and mine.retries_left == 2
    assert mine.func_name == "patchd.workers.jobs.mine" and mine.args == ("r1", "/art", "{}")
    assert mine.meta["run_id"] == "r1" and mine.result_ttl == jobqueue.RESULT_TTL_S
    keys = sorted(conn.keys("rq:job:*"))
    again = jobqueue.enqueue_run(conn, config, "r1", "/art", "{}")
    assert again == ids and sorted(conn.keys("rq:job:*")) == keys
    assert queue.job_ids == ["r1-collect"]


def test_connection_is_binary(clean_redis: str) -> None:
    conn = jobqueue.connect(clean_redis)
    assert isinstance(conn, Redis)
    assert not conn.connection_pool.connection_kwargs.get("decode_responses", False)


def test_cancel_cancels_waiting_jobs(clean_redis: str) -> None:
    conn = jobqueue.connect(clean_redis)
    config = build_config({"redis": {"url": clean_redis}})
    ids = jobqueue.enqueue_run(conn, config, "r2", "/art", "{}")
    done = jobqueue.cancel_jobs(conn, list(ids.values()))
    assert len(done) == 5 and all(d.endswith(":cancel") for d in done)
    states = {s: jobqueue.job_state(conn, j) for s, j in ids.items()}
    assert {st.status for st in states.values()} == {"canceled"}
    assert assess(states).state == "cancelled"
    assert Queue("patchd", connection=conn).job_ids == []


def _states(**statuses: str) -> dict[str, JobState]:
    return {s: JobState(f"r-{s}", statuses.get(s, "deferred")) for s in jobqueue.STAGES}


def test_assess_maps_job_statuses_to_run_state() -> None:
    prog = assess(_states(collect="queued"))
    assert (prog.state, prog.stage) == ("queued", "collect")
    states = _states(collect="finished", mine="started")
    states["collect"] = JobState("r-collect", "finished", started_at=1.0, ended_at=3.5)
    states["mine"] = JobState("r-mine", "started", progress=0.5, message="svm")
    prog = assess(states)
    assert (prog.state, prog.stage) == ("running", "mine") and prog.finished == {"collect": 2.5}
    assert prog.result == {"stage": "mine", "progress": 0.5, "message": "svm"}
    done = {s: JobState(f"r-{s}", "finished", result={"s": s}) for s in jobqueue.STAGES}
    prog = assess(done)
    assert prog.state == "succeeded" and prog.result == {"s": "evaluate"}


def test_assess_failures_carry_a_clear_error() -> None:
    states = _states(collect="finished", mine="finished")
    states["synthesize"] = JobState("r-synthesize", "failed", error="synthesize: boom")
    prog = assess(states)
    assert (prog.state, prog.stage, prog.error) == ("failed", "synthesize", "synthesize: boom")
    states["synthesize"] = JobState(
        "r-synthesize",
        "failed",
        error="Moved to FailedJobRegistry, due to AbandonedJobError, at 2026-11-23",
    )
    prog = assess(states)
    assert prog.abandoned and "died" in (prog.error or "")
    states["synthesize"] = JobState("r-synthesize", "missing")
    assert assess(states).missing


def test_cleanup_fails_or_retries_abandoned_jobs_but_not_finished_ones(clean_redis: str) -> None:
    from rq.job import JobStatus
    from rq.registry import StartedJobRegistry

    conn = jobqueue.connect(clean_redis)
    config = build_config({"redis": {"url": clean_redis}, "patch": {"retries": 1}})
    ids = jobqueue.enqueue_run(conn, config, "r3", "/art", "{}")
    queue = Queue("patchd", connection=conn)
    registry = StartedJobRegistry(queue=queue)
    collect, mine = (Job.fetch(ids[s], connection=conn) for s in ("collect", "mine"))
    conn.lrem(queue.key, 0, collect.id)  # a worker took it ...
    collect.set_status(JobStatus.STARTED)  # ... and died while running it
    mine.set_status(JobStatus.FINISHED)
    for job in (collect, mine):  # entries whose heartbeat expired long ago
        conn.zadd(registry.key, {f"{job.id}:exec1": 1})
    jobqueue.cleanup_abandoned(conn, ["patchd"])
    assert conn.zcard(registry.key) == 0
    assert jobqueue.job_state(conn, ids["mine"]).status == "finished"  # rq#2424 guarded
    retried = Job.fetch(ids["collect"], connection=conn)
    assert retried.get_status().value == "queued" and retried.retries_left == 0
    assert queue.job_ids == [ids["collect"]]

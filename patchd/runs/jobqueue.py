"""The RQ side of a patch run, seen from serve: queues, job ids, enqueueing, status, cancel.

- One job per stage, chained with ``depends_on``: ``collect → mine → synthesize → train →
  evaluate``. Job ids are ``<run_id>-<stage>``, so enqueueing a run twice is a no-op (a job that
  already exists is kept, only missing ones are created).
- Queue per stage: ``patch.queues[stage]``, else ``redis.queue_prefix``; GPU machines run
  ``patchd worker --queues patchd-gpu`` and take the stages mapped there.
- Every job has an explicit ``job_timeout`` (``patch.stage_timeout_s`` or :data:`DEFAULT_TIMEOUTS`,
  never RQ's 180 s), bounded ``Retry(max=patch.retries)`` (immediate: interval 0), a long
  result/failure TTL, and progress in ``job.meta`` (see :func:`report_progress`).
- Job functions are given by dotted name so serve never imports the worker code (torch).
- The Redis connection is made without ``decode_responses`` (RQ stores binary pickles).
- A run that waits for a person's Defuse region labels (:func:`waits_for_labels`) is enqueued up
  to :data:`LABEL_PAUSE_AFTER` only; resuming it enqueues the rest (``stages=`` of
  :func:`enqueue_run`).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from redis import Redis

from patchd.exceptions import ConfigError, ValidationError

if TYPE_CHECKING:
    from rq.job import Job

    from patchd.config import Config

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("collect", "mine", "synthesize", "train", "evaluate")
LABEL_PAUSE_AFTER = "synthesize"  # a run waiting for region labels pauses after this stage
LABEL_TIMEOUT_H = 72.0  # default of patch.params.defuse.label_timeout_h
DEFAULT_TIMEOUTS: dict[str, int] = {
    "collect": 1800,
    "mine": 3600,
    "synthesize": 4 * 3600,
    "train": 4 * 3600,
    "evaluate": 1800,
}
RESULT_TTL_S = 14 * 86400
FAILURE_TTL_S = 30 * 86400
JOB_FUNCTION = "patchd.workers.jobs.{stage}"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")

# RQ job statuses, grouped the way a run cares about them
DONE = "finished"
FAILED = frozenset({"failed", "stopped"})
CANCELED = "canceled"


def connect(url: str) -> Redis:
    """A Redis client for RQ: binary responses (never ``decode_responses=True``)."""
    return Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)


def job_id(run_id: str, stage: str) -> str:
    """``<run_id>-<stage>``; RQ allows only ``[A-Za-z0-9_-]`` in ids."""
    if not RUN_ID_RE.match(run_id):
        raise ValidationError("bad_run_id", f"run id {run_id!r} must match {RUN_ID_RE.pattern}")
    if stage not in STAGES:
        raise ValidationError("bad_stage", f"stage {stage!r} is not one of {STAGES}")
    return f"{run_id}-{stage}"


def queue_name(config: Config, stage: str) -> str:
    return config.patch.queues.get(stage, config.redis.queue_prefix)


def queue_names(config: Config) -> list[str]:
    """Every queue a stage may go to (the default first)."""
    names = [config.redis.queue_prefix, *config.patch.queues.values()]
    return list(dict.fromkeys(names))


def stage_timeout(config: Config, stage: str) -> int:
    timeout = config.patch.stage_timeout_s.get(stage, DEFAULT_TIMEOUTS[stage])
    if timeout <= 0:
        raise ConfigError(f"patch.stage_timeout_s.{stage} must be > 0 seconds, got {timeout}")
    return int(timeout)


def check_patch_config(config: Config) -> None:
    """Unknown stage names in ``patch.queues`` / ``patch.stage_timeout_s`` are config errors."""
    for section in ("queues", "stage_timeout_s"):
        unknown = set(getattr(config.patch, section)) - set(STAGES)
        if unknown:
            raise ConfigError(
                f"patch.{section} has unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}"
            )
    for stage in STAGES:
        stage_timeout(config, stage)
    waits_for_labels(config)
    label_timeout_s(config)


def waits_for_labels(config: Config) -> bool:
    """Whether a run with ``config`` pauses after synthesize for a person's region labels: its
    augmenter is ``vae`` (Defuse regions) and ``patch.params.defuse.wait_for_labels`` (default
    true) is not false."""
    if config.patch.augmenter != "vae":
        return False
    wait = config.patch.params.get("defuse", {}).get("wait_for_labels", True)
    if not isinstance(wait, bool):
        raise ConfigError(
            f"patch.params.defuse.wait_for_labels must be true or false, got {wait!r}"
        )
    return wait


def label_timeout_s(config: Config) -> float:
    """``patch.params.defuse.label_timeout_h`` (default 72) in seconds; > 0."""
    hours = config.patch.params.get("defuse", {}).get("label_timeout_h", LABEL_TIMEOUT_H)
    if isinstance(hours, bool) or not isinstance(hours, int | float) or hours <= 0:
        raise ConfigError(f"patch.params.defuse.label_timeout_h must be > 0 hours, got {hours!r}")
    return float(hours) * 3600.0


def first_stages(config: Config) -> tuple[str, ...]:
    """The stages enqueued when a run is created: all, or up to synthesize when it waits."""
    if waits_for_labels(config):
        return STAGES[: STAGES.index(LABEL_PAUSE_AFTER) + 1]
    return STAGES


def enqueue_run(
    conn: Redis,
    config: Config,
    run_id: str,
    artifacts_root: str,
    recipe_json: str,
    stages: tuple[str, ...] = STAGES,
) -> dict[str, str]:
    """Enqueue ``stages`` (in order, each depending on the one before it; the first on none);
    returns ``stage -> job id``. Existing jobs are left as they are."""
    from rq import Queue, Retry
    from rq.job import Job

    ids: dict[str, str] = {}
    previous: str | None = None
    for stage in stages:
        jid = job_id(run_id, stage)
        if Job.exists(jid, connection=conn):
            log.debug("run %s: job %s exists, not enqueued again", run_id, jid)
        else:
            queue = Queue(queue_name(config, stage), connection=conn)
            retry = Retry(max=config.patch.retries) if config.patch.retries > 0 else None
            queue.enqueue(
                JOB_FUNCTION.format(stage=stage),
                args=(run_id, artifacts_root, recipe_json),
                job_id=jid,
                depends_on=previous,
                job_timeout=stage_timeout(config, stage),
                result_ttl=RESULT_TTL_S,
                failure_ttl=FAILURE_TTL_S,
                retry=retry,
                meta={"run_id": run_id, "stage": stage, "progress": 0.0},
                description=f"patchd {stage} for run {run_id}",
            )
        ids[stage] = jid
        previous = jid
    return ids


@dataclass(frozen=True)
class JobState:
    """What serve needs to know about one stage job."""

    job_id: str
    status: str  # an RQ JobStatus value, or "missing" when the job is gone from Redis
    progress: float = 0.0
    message: str = ""
    error: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    result: dict[str, Any] | None = None

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _error_of(job: Job) -> str | None:
    meta_error = job.meta.get("error")
    if meta_error:
        return str(meta_error)
    exc = job.exc_info or ""
    lines = [line for line in exc.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def job_state(conn: Redis, jid: str) -> JobState:
    from rq.exceptions import NoSuchJobError
    from rq.job import Job

    try:
        job = Job.fetch(jid, connection=conn)
    except NoSuchJobError:
        return JobState(jid, "missing")
    status = job.get_status(refresh=False)
    status_name = status.value if status is not None else "missing"
    result = job.return_value() if status_name == DONE else None
    return JobState(
        job_id=jid,
        status=status_name,
        progress=float(job.meta.get("progress", 0.0)),
        message=str(job.meta.get("message", "")),
        error=_error_of(job) if status_name in FAILED else None,
        started_at=_ts(job.started_at),
        ended_at=_ts(job.ended_at),
        result=result if isinstance(result, dict) else None,
    )


def cancel_jobs(conn: Redis, job_ids: list[str]) -> list[str]:
    """Cancel queued/deferred jobs and stop a running one; returns what was done per job."""
    from rq.command import send_stop_job_command
    from rq.exceptions import InvalidJobOperation, NoSuchJobError
    from rq.job import Job

    done: list[str] = []
    for jid in reversed(job_ids):  # dependents first, so none gets enqueued meanwhile
        try:
            job = Job.fetch(jid, connection=conn)
        except NoSuchJobError:
            continue
        status = job.get_status(refresh=False)
        try:
            if status is not None and status.value == "started":
                send_stop_job_command(conn, jid)
                done.append(f"{jid}:stop")
            elif status is not None and status.value not in (DONE, *FAILED, CANCELED):
                job.cancel()
                done.append(f"{jid}:cancel")
        except InvalidJobOperation as err:
            log.info("job %s: cannot cancel/stop (%s)", jid, err)
    return done


def cleanup_abandoned(conn: Redis, names: list[str]) -> None:
    """Run RQ's abandoned-job detection now rather than waiting for a worker's maintenance.

    A job whose worker died (SIGKILL, node loss) keeps its StartedJobRegistry entry until its
    heartbeat expires; ``cleanup`` then retries it (retries left) or fails it. Expired entries of
    jobs that are no longer ``started`` are dropped first: rq 2.x would otherwise move a job that
    already finished to the failed registry as "abandoned" (rq#2424, fixed only in 3.0).
    """
    from rq import Queue
    from rq.registry import StartedJobRegistry
    from rq.utils import as_text

    for name in names:
        registry = StartedJobRegistry(queue=Queue(name, connection=conn))
        # without withscores the reply is the members only (the stubs cannot tell)
        members = cast(list[bytes | str], conn.zrangebyscore(registry.key, 0, time.time()))
        for raw in members:
            status = job_state(conn, registry.parse_job_id(as_text(raw))).status
            if status != "started":
                conn.zrem(registry.key, raw)
        registry.cleanup()


def report_progress(fraction: float, message: str = "") -> None:
    """Inside a job: record progress in ``job.meta`` (no-op outside a job)."""
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return
    job.meta["progress"] = round(max(0.0, min(1.0, fraction)), 4)
    job.meta["message"] = message[:200]
    job.meta["updated_at"] = time.time()
    job.save_meta()

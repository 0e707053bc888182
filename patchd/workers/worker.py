"""``patchd worker``: a forking RQ worker for the patch stages.

- RQ's default :class:`rq.Worker` forks a work horse per job: memory (and GPU memory) is freed
  after every stage and a crash in a stage never takes the worker loop down.
- The parent may import torch (so each horse starts fast) but never runs a tensor op or touches
  CUDA: both break in a forked child. Torch threads are set inside the horse, and the stage picks
  CUDA there when it is present.
- ``with_scheduler=True`` so retries and scheduled jobs fire without a separate process.
- Heartbeats: a job's StartedJobRegistry entry expires ``min(timeout left, monitoring
  interval) + grace`` seconds after the last heartbeat. RQ's grace is a fixed 60 s;
  ``patch.heartbeat_grace_s`` makes it configurable so serve detects a dead worker sooner (it
  runs the cleanup on its tick).
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

from rq import Queue, Worker

from patchd.runs import jobqueue

if TYPE_CHECKING:
    from rq.job import Job

    from patchd.config import Config

log = logging.getLogger(__name__)


class PatchWorker(Worker):
    """RQ's forking worker with a configurable heartbeat grace and torch threads per horse."""

    def __init__(
        self, *args: Any, heartbeat_grace_s: int = 60, torch_threads: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.heartbeat_grace_s = heartbeat_grace_s
        self.torch_threads = torch_threads

    def get_heartbeat_ttl(self, job: Job) -> int:
        if job.timeout and job.timeout > 0:
            remaining = job.timeout - self.current_job_working_time
            return int(min(remaining, self.job_monitoring_interval)) + self.heartbeat_grace_s
        return int(self.job_monitoring_interval) + self.heartbeat_grace_s

    def main_work_horse(self, job: Job, queue: Queue) -> None:
        threads = self.torch_threads or default_threads()
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        try:
            import torch

            torch.set_num_threads(threads)
        except ImportError:  # a worker without the ML extra can still run light jobs
            pass
        super().main_work_horse(job, queue)


def default_threads() -> int:
    """Half the cores: serve, the model server and RQ's parent need the rest. Oversubscribed
    OpenMP threads spin-wait, and on a busy 2-core machine a 2-thread job ran 20x slower than a
    1-thread one (CycleGAN steps, measured)."""
    return max(1, (os.cpu_count() or 2) // 2)


def build_worker(config: Config, queues: list[str] | None = None) -> PatchWorker:
    jobqueue.check_patch_config(config)
    conn = jobqueue.connect(config.redis.url)
    names = queues or jobqueue.queue_names(config)
    return PatchWorker(
        [Queue(name, connection=conn) for name in names],
        connection=conn,
        job_monitoring_interval=config.patch.job_monitoring_interval_s,
        heartbeat_grace_s=config.patch.heartbeat_grace_s,
        torch_threads=config.patch.torch_threads,
    )


PRELOAD = (
    "torch",
    "torch._dynamo",  # imported lazily by the first optimizer: seconds per forked horse otherwise
    "patchd.workers.jobs",
    "patchd.ml.models",
    "patchd.ml.datasets",
    "patchd.ml.training",
    "patchd.ml.evaluate",
)


def preload(config: Config) -> None:
    """Import (never run) the heavy modules so each forked horse starts without import cost."""
    from patchd.plugins.catalog import resolve

    plugins = [
        resolve(kind, getattr(config.patch, kind)).partition(":")[0]
        for kind in ("miner", "augmenter", "trainer")
    ]
    for name in (*PRELOAD, *plugins):
        try:
            importlib.import_module(name)
        except Exception as err:  # the job reports it properly; the worker still starts
            log.warning("preload of %s failed: %s", name, err)


def run_worker(config: Config, queues: list[str] | None = None, burst: bool = False) -> bool:
    """Work until stopped (or until the queues are empty with ``burst``)."""
    worker = build_worker(config, queues)
    from patchd.workers.jobs import export_caches

    export_caches(config, os.environ)  # this machine's caches of a bucket, for every horse
    preload(config)
    log.info("worker %s listening on %s", worker.name, [q.name for q in worker.queues])
    return bool(worker.work(burst=burst, with_scheduler=True, logging_level=config.log_level))

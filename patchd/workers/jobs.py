"""The RQ job functions: one small function per stage.

Each takes ``(run_id, artifacts_root, recipe_json)`` and returns a small JSON-able dict (the
stage manifest's summary). Contract of every stage:

- **Idempotent**: when ``<artifacts>/runs/<run_id>/<stage>/`` exists and its manifest verifies,
  the stage returns it without recomputing, so a retry or a re-run never duplicates artifacts.
- **Atomic output**: files are built in a temp dir and renamed into place (``workers.artifacts``).
- **Bounded disk**: the stage's bytes and the run's bytes so far go into the result
  (``disk_bytes``, ``run_disk_bytes``); a stage that takes the run past
  ``artifacts.max_run_disk_mb`` fails (not retried) with an error naming the stage and sizes.
- **Clear failures**: a :class:`PatchdError` (bad input, bad weights, bad plugin) is raised as a
  :class:`StageError` whose message is also put in ``job.meta["error"]`` for the run, and it is
  not retried (retrying cannot fix bad input). Other exceptions are retried up to
  ``patch.retries`` times. The worker loop survives both: the stage runs in a forked horse.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.exceptions import PatchdError, StageError
from patchd.runs import jobqueue
from patchd.runs.artifacts import SLICE, RunArtifacts
from patchd.runs.recipe import Recipe
from patchd.workers import artifacts
from patchd.workers.stages import collect as collect_stage
from patchd.workers.stages import learn

if TYPE_CHECKING:
    from patchd.config import Config

log = logging.getLogger(__name__)

StageFn = Callable[..., dict[str, Any]]


def summary(manifest: artifacts.StageManifest, directory: Path, reused: bool) -> dict[str, Any]:
    return {
        "stage": manifest.stage,
        "run_id": manifest.run_id,
        "dir": str(directory),
        "files": sorted(manifest.files),
        "result": manifest.result,
        "reused": reused,
    }


def _mark_failed(message: str, retry: bool) -> None:
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        return
    job.meta["error"] = message
    job.save_meta()
    if not retry:
        job.retries_left = 0  # the worker reads this from the same object when the job fails


def run_stage(
    stage: str, fn: StageFn, run_id: str, artifacts_root: str, recipe_json: str
) -> dict[str, Any]:
    """Shared wrapper: reuse a verified output, else fetch the inputs, build, publish, summarise.

    ``artifacts_root`` is a local directory or, when ``artifacts.root`` is a bucket, its URL:
    the stage then reads the run's published stages into the local cache (each file checked
    against its manifest), builds there, and uploads its files and then its manifest."""
    recipe = Recipe.from_json(recipe_json)
    config = local_caches(recipe.effective_config(), os.environ)
    store = RunArtifacts.from_config(config, artifacts_root)
    final = store.stage_dir(run_id, stage)
    done = _published(store, run_id, stage)
    if done is not None:
        log.info("run %s: %s already done (%s), reusing it", run_id, stage, final)
        return summary(done, final, reused=True)
    jobqueue.report_progress(0.0, f"{stage} started")
    try:
        _fetch_inputs(store, recipe, run_id, stage)
        with artifacts.building(final) as tmp:
            result = fn(run_id=run_id, run_dir=final.parent, out=tmp, recipe=recipe, config=config)
            use = artifacts.check_disk(final.parent, tmp, config.artifacts.max_run_disk_mb)
            result = {**result, "disk_bytes": use.stage_bytes, "run_disk_bytes": use.run_bytes}
            manifest = artifacts.publish(tmp, final, run_id, result)
        manifest = store.publish_stage(run_id, stage)
    except PatchdError as err:
        message = f"{stage}: {err}"
        _mark_failed(message, retry=False)
        raise StageError(message) from err
    except Exception as err:
        _mark_failed(f"{stage}: {type(err).__name__}: {err}", retry=True)
        raise
    jobqueue.report_progress(1.0, f"{stage} done")
    log.info("run %s: %s done, %d files in %s", run_id, stage, len(manifest.files), final)
    return summary(manifest, final, reused=False)


CACHE_ENV = {"artifacts": "PATCHD_ARTIFACTS__CACHE_DIR", "registry": "PATCHD_REGISTRY__CACHE_DIR"}


def local_caches(config: Config, environ: Mapping[str, str]) -> Config:
    """The recipe's config with this machine's cache dirs (``patchd worker`` exports its own
    config's into the environment its horses inherit): serve's paths need not exist here."""
    updates = {}
    for section, name in CACHE_ENV.items():
        if environ.get(name):
            current = getattr(config, section)
            updates[section] = current.model_copy(update={"cache_dir": Path(environ[name])})
    return config.model_copy(update=updates) if updates else config


def export_caches(config: Config, environ: MutableMapping[str, str]) -> None:
    """What :func:`local_caches` reads, from the worker's own config (a bucket root only)."""
    for section, name, url, root in (
        ("artifacts", CACHE_ENV["artifacts"], config.artifacts_url, config.artifacts_root),
        ("registry", CACHE_ENV["registry"], config.registry_url, config.registry_root),
    ):
        if url is not None:
            environ.setdefault(name, str(Path(root).resolve()))
            log.info("worker caches %s of %s under %s", section, url, environ[name])


def _published(store: RunArtifacts, run_id: str, stage: str) -> artifacts.StageManifest | None:
    """The stage's verified output if an earlier attempt finished it (here or elsewhere)."""
    if store.blobs is None:
        return artifacts.existing(store.stage_dir(run_id, stage))
    done = store.fetch(run_id, stage)
    if done is None and artifacts.existing(store.stage_dir(run_id, stage)) is not None:
        done = store.publish_stage(run_id, stage)  # built here, the upload was cut short
    return done


def _fetch_inputs(store: RunArtifacts, recipe: Recipe, run_id: str, stage: str) -> None:
    """The slice and the earlier stages' outputs into the local cache (bucket only)."""
    if store.blobs is None:
        return
    if stage == jobqueue.STAGES[0] and recipe.slice_sha256:
        store.fetch_file(run_id, SLICE, recipe.slice_sha256)
    if stage == "train":  # a person's Defuse region labels, when serve published them
        for name in store.label_files(run_id):
            store.fetch_file(run_id, name)
    earlier = jobqueue.STAGES[: jobqueue.STAGES.index(stage)]
    fetched = store.fetch_run(run_id, earlier)
    log.info("run %s: %s read %s from %s", run_id, stage, fetched, store.blobs.url)


def collect(run_id: str, artifacts_root: str, recipe_json: str) -> dict[str, Any]:
    return run_stage("collect", collect_stage.run, run_id, artifacts_root, recipe_json)


def mine(run_id: str, artifacts_root: str, recipe_json: str) -> dict[str, Any]:
    return run_stage("mine", learn.mine, run_id, artifacts_root, recipe_json)


def synthesize(run_id: str, artifacts_root: str, recipe_json: str) -> dict[str, Any]:
    return run_stage("synthesize", learn.synthesize, run_id, artifacts_root, recipe_json)


def train(run_id: str, artifacts_root: str, recipe_json: str) -> dict[str, Any]:
    return run_stage("train", learn.train, run_id, artifacts_root, recipe_json)


def evaluate(run_id: str, artifacts_root: str, recipe_json: str) -> dict[str, Any]:
    return run_stage("evaluate", learn.evaluate, run_id, artifacts_root, recipe_json)

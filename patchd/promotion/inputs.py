"""What the gate reads about a finished run: artifacts (verified) and the run record.

Paths come only from ``config.artifacts_root`` and a validated run id; the weights are checked
against the train stage's manifest before anything is published. With the artifacts in a bucket,
the files are fetched into the local cache first, each checked against its stage's published
manifest (:mod:`patchd.runs.artifacts`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.exceptions import IntegrityError, NotFoundError
from patchd.promotion.registry import Registry, sha256_file
from patchd.runs.artifacts import RunArtifacts
from patchd.runs.jobqueue import STAGES

if TYPE_CHECKING:
    from patchd.config import Config
    from patchd.promotion.record import Candidate, RunInputs
    from patchd.promotion.report.candidate import CandidateReport
    from patchd.store.backend import Store

log = logging.getLogger(__name__)


def run_dir(config: Config, run_id: str) -> Path:
    return RunArtifacts.from_config(config).run_dir(run_id)


def stage_file(artifacts: RunArtifacts, run_id: str, stage: str, name: str) -> Path:
    """A run's file in the local dir; from a bucket, fetched and checked against the stage's
    published manifest first (an unpublished stage is not found, whatever files exist)."""
    if artifacts.blobs is not None and artifacts.fetch(run_id, stage, [name]) is None:
        where = f"{artifacts.location}/runs/{run_id}/{stage}/{name}"
        raise NotFoundError("run artifact", f"{where} (the {stage} stage is not published)")
    path = artifacts.stage_dir(run_id, stage) / name
    if not path.is_file():
        raise NotFoundError("run artifact", str(path))
    return path


def _manifest_files(stage_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((stage_dir / "manifest.json").read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise IntegrityError(f"{stage_dir}/manifest.json is not valid JSON: {err}") from None
    return {str(k): str(v) for k, v in dict(data.get("files", {})).items()}


def run_record(store: Store, run_id: str) -> dict[str, Any]:
    """The run's recipe summary and stage timings ({} when the runs table has no such run)."""
    with store.read() as conn:
        row = conn.execute(
            "SELECT recipe, stage_times FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
    if row is None:
        return {}
    recipe = _loads(row[0])
    summary: dict[str, Any] = {
        k: recipe[k] for k in ("miner", "augmenter", "trainer") if k in recipe
    }
    budget = recipe.get("config", {}).get("patch", {}).get("budget")
    if budget:
        summary["budget"] = budget
    for key in ("incumbent_sha256", "incumbent_source", "slice_rows"):
        if key in recipe:
            summary[key] = recipe[key]
    times = {str(k): float(v) for k, v in _loads(row[1]).items() if isinstance(v, int | float)}
    return {"recipe": summary, "stage_seconds": times}


def _loads(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_run_inputs(
    config: Config, store: Store, registry: Registry, run_id: str, model: str
) -> RunInputs:
    from patchd.promotion.record import RunInputs

    artifacts = RunArtifacts.from_config(config)
    rdir = artifacts.run_dir(run_id)
    weights = stage_file(artifacts, run_id, "train", "model.safetensors")
    evaluation = stage_file(artifacts, run_id, "evaluate", "evaluation.json")
    if artifacts.blobs is not None:  # the data digests are the collect manifest's
        artifacts.fetch(run_id, "collect", [])
    expected = _manifest_files(rdir / "train").get("model.safetensors")
    if expected and sha256_file(weights) != expected:
        raise IntegrityError(f"{weights} does not match the sha256 in its stage manifest")
    record = run_record(store, run_id)
    recipe = record.get("recipe", {})
    pointer = registry.pointer(model)
    parent = recipe.get("incumbent_sha256") or (pointer.sha256 if pointer else None)
    return RunInputs(
        run_dir=rdir,
        weights=weights,
        evaluation_text=evaluation.read_text(),
        recipe=recipe,
        stage_seconds=record.get("stage_seconds", {}),
        parent=parent,
        data_digests=_manifest_files(rdir / "collect"),
    )


def candidate_report(
    config: Config, cand: Candidate, evaluation_json: str | None, store: Store
) -> CandidateReport:
    """The report of a gated candidate from its stored evaluation and its run's artifacts."""
    from patchd.evaluation import PairedEvaluation
    from patchd.promotion.report import build_report

    if cand.gate is None or evaluation_json is None:
        raise NotFoundError("report of candidate", cand.id)
    record = run_record(store, cand.run_id)
    artifacts = RunArtifacts.from_config(config)
    rdir = artifacts.run_dir(cand.run_id)
    if artifacts.blobs is not None:
        artifacts.fetch_small(cand.run_id, STAGES)
    return build_report(
        candidate_id=cand.id,
        model=cand.model,
        digest=cand.digest,
        parent=cand.parent,
        run_id=cand.run_id,
        state=cand.state,
        decision=cand.gate,
        evaluation=PairedEvaluation.from_json(evaluation_json),
        recipe=record.get("recipe", {}),
        stage_seconds=record.get("stage_seconds", {}),
        run_dir=rdir if rdir.is_dir() else None,
        expires_at=cand.expires_at if cand.state == "awaiting_approval" else None,
        decided_by=cand.decided_by,
    )

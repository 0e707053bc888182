"""Which mined pseudo-groups the monitor uses (``monitor.mined_groups``).

- ``off``: none;
- a path: that file;
- ``latest`` (default): ``mine/mined_groups.json`` of the newest succeeded run of the model whose
  incumbent is the production model (the directions live in that model's embedding space: after
  a promotion the old run's directions no longer apply, and none is used until a run mines the
  new model). The file's sha256 must match the stage's manifest.

Either way the file is read with strict validation (:func:`patchd.monitor.mined.read`); a bad
file is logged and shown in the status, and the monitor goes on without mined groups.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from patchd.digests import sha256_file
from patchd.exceptions import PatchdError
from patchd.monitor import mined as minedmod
from patchd.runs.artifacts import RunArtifacts
from patchd.runs.records import select_runs
from patchd.store.backend import Connection

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"  # the stage manifest beside the file (patchd.workers.artifacts)
SCAN = 50  # newest succeeded runs looked at for a mined_groups.json


@dataclass(frozen=True, eq=False)
class Resolved:
    mined: minedmod.MinedGroups | None
    note: str  # where they come from, or why none is used


def resolve(
    setting: str,
    conn: Connection,
    artifacts_root: Path | RunArtifacts,
    model: str,
    classes: list[str],
    production: str | None,
) -> Resolved:
    """The pseudo-groups ``setting`` selects (``production``: the registry's digest, if any;
    ``artifacts_root``: a local directory, or the run artifacts, fetched from their bucket)."""
    if setting == "off":
        return Resolved(None, "off")
    if setting != "latest":
        return _load(Path(setting), model, classes, production, f"configured file {setting}")
    artifacts = (
        artifacts_root
        if isinstance(artifacts_root, RunArtifacts)
        else RunArtifacts(Path(artifacts_root))
    )
    try:
        path = latest_path(conn, artifacts, model, production)
    except PatchdError as err:  # a bucket that does not answer, an object that does not verify
        log.error("model=%s: mined groups not used: %s", model, err)
        return Resolved(None, f"not used: {err}")
    if path is None:
        return Resolved(None, "no succeeded run of the production model has mined groups yet")
    try:
        _check_manifest(path)
    except PatchdError as err:
        log.error("model=%s: mined groups not used: %s", model, err)
        return Resolved(None, f"not used: {err}")
    return _load(path, model, classes, production, f"run {path.parent.parent.name}")


def latest_path(
    conn: Connection, artifacts: RunArtifacts, model: str, production: str | None
) -> Path | None:
    """``mined_groups.json`` of the newest succeeded run of ``model`` mined on ``production``."""
    runs = select_runs(
        conn,
        "WHERE model = ? AND state = 'succeeded' ORDER BY updated_at DESC LIMIT ?",
        (model, SCAN),
    )
    for run in runs:
        if production is not None and run.recipe.get("incumbent_sha256") != production:
            continue
        if artifacts.blobs is not None:
            manifest = artifacts.manifest(run.id, "mine")
            if manifest is None or minedmod.FILE not in manifest.files:
                continue
            artifacts.fetch(run.id, "mine", [minedmod.FILE])  # checked against the manifest
        path = artifacts.stage_dir(run.id, "mine") / minedmod.FILE
        if path.is_file():
            return path
    return None


def _load(
    path: Path, model: str, classes: list[str], production: str | None, origin: str
) -> Resolved:
    try:
        mined = minedmod.read(path, classes)
    except PatchdError as err:
        log.error("model=%s: mined groups not used: %s", model, err)
        return Resolved(None, f"not used: {err}")
    if mined.model != model:
        return Resolved(None, f"not used: {path} is for model {mined.model!r}, not {model!r}")
    if production is not None and mined.incumbent_sha256 != production:
        note = (
            f"not used: {path} was mined on model {mined.incumbent_sha256[:12]}, "
            f"production is {production[:12]}"
        )
        log.warning("%s", note)
        return Resolved(None, note)
    return Resolved(mined, origin)


def _check_manifest(path: Path) -> None:
    manifest = path.parent / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = files[path.name]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise minedmod.bad_file(str(manifest), "files", f"does not list {path.name}") from err
    if sha256_file(path) != expected:
        raise minedmod.bad_file(str(path), "file", "does not match its stage manifest's sha256")

"""A run's artifacts where serve and every worker find them: a directory, or a bucket.

Layout (the same under a local ``artifacts.root`` and under ``s3://bucket/prefix``)::

    runs/<run_id>/slice.jsonl                 labeled production events (serve)
    runs/<run_id>/<stage>/<files>             a stage's output (a worker)
    runs/<run_id>/<stage>/manifest.json       {"schema", "stage", "run_id", "files": {name:
                                               sha256}, "result"}: published last

In a bucket a stage's files go under one upload attempt, ``runs/<run_id>/<stage>/<attempt>/``,
and the manifest names it (``"attempt"``): objects are never overwritten, so two attempts of a
stage (a retry beside a worker thought dead) cannot mix their files; the one whose create-only
manifest lands first is the stage, the other deletes its upload and takes the winner's.

With a local root, the stage directory is built in a temp dir and renamed into place
(:mod:`patchd.workers.artifacts`). With a bucket, ``config.artifacts_root`` is a local cache:
the stage is built there the same way, then :meth:`RunArtifacts.publish_stage` uploads every
file and, last, the manifest (create-only, so two attempts of one stage cannot both publish).
A reader (the next stage's worker, the gate, the monitor's mined groups, the report) calls
:meth:`RunArtifacts.fetch`: it reads the manifest first, downloads the files it needs into the
cache and checks each one's sha256 against the manifest before anything uses it. A stage whose
manifest is absent is not published, whatever files are beside it.

Torch-free: serve imports this module.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.digests import sha256_file
from patchd.exceptions import ConflictError, IntegrityError, NotFoundError, ValidationError
from patchd.runs.regions import done_path, labels_path
from patchd.store.blobs import BlobStore, open_blobs, write_atomic

if TYPE_CHECKING:
    from patchd.config import Config

log = logging.getLogger(__name__)

SCHEMA = 1
MANIFEST = "manifest.json"
SLICE = "slice.jsonl"


@dataclass(frozen=True)
class StageManifest:
    stage: str
    run_id: str
    files: dict[str, str]  # relative posix name -> sha256 hex
    result: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA
    # in a bucket: the upload attempt whose objects (``<stage>/<attempt>/<name>``) it vouches for
    attempt: str = ""

    def to_json(self) -> str:
        body = {
            "schema": self.schema,
            "stage": self.stage,
            "run_id": self.run_id,
            "files": self.files,
            "result": self.result,
        }
        if self.attempt:
            body["attempt"] = self.attempt
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> StageManifest:
        data = json.loads(text)
        if data.get("schema") != SCHEMA:
            raise IntegrityError(f"manifest schema {data.get('schema')!r} is not {SCHEMA}")
        files, result = dict(data["files"]), dict(data["result"])
        return cls(data["stage"], data["run_id"], files, result, attempt=data.get("attempt", ""))


def stage_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(directory: Path) -> StageManifest:
    try:
        return StageManifest.from_json((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise IntegrityError(f"{directory} has no {MANIFEST}") from None
    except (KeyError, ValueError, TypeError) as err:
        raise IntegrityError(f"{directory / MANIFEST} is unreadable: {err}") from None


def verify(directory: Path) -> StageManifest:
    """The manifest of a stage directory after checking every file's sha256 (IntegrityError)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    present = {p.relative_to(directory).as_posix() for p in stage_files(directory)}
    if present != set(manifest.files):
        extra, missing = present - set(manifest.files), set(manifest.files) - present
        raise IntegrityError(
            f"{directory}: files differ from manifest (extra {sorted(extra)}, "
            f"missing {sorted(missing)})"
        )
    for name, expected in manifest.files.items():
        actual = sha256_file(directory / name)
        if actual != expected:
            raise IntegrityError(f"{directory / name}: sha256 {actual} != manifest {expected}")
    return manifest


class RunArtifacts:
    """Run artifacts under a local ``root``, published to ``blobs`` when it is a bucket."""

    def __init__(self, root: Path, blobs: BlobStore | None = None) -> None:
        self.root = Path(root)
        self.blobs = blobs

    @classmethod
    def from_config(cls, config: Config, location: str | None = None) -> RunArtifacts:
        """The configured artifacts (``location``: the root a job was handed, URL or path)."""
        url = config.artifacts_url if location is None else location
        if url is None or "://" not in url:
            return cls(Path(url) if url else config.artifacts_root)
        return cls(config.artifacts_root, open_blobs(url, config.artifacts.storage_options))

    @property
    def location(self) -> str:
        """What a job is handed: the bucket URL, or the local root."""
        return self.blobs.url if self.blobs is not None else str(self.root)

    def run_dir(self, run_id: str) -> Path:
        """``<root>/runs/<run_id>``; a run id is a plain name, never a path."""
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise ValidationError("bad_run_id", f"run id {run_id!r} is not a plain run id")
        return self.root.resolve() / "runs" / run_id

    def stage_dir(self, run_id: str, stage: str) -> Path:
        return self.run_dir(run_id) / stage

    def _key(self, run_id: str, *parts: str) -> str:
        self.run_dir(run_id)  # validates the id
        return "/".join(("runs", run_id, *parts))

    # -- reading -----------------------------------------------------------------------------
    def manifest(self, run_id: str, stage: str) -> StageManifest | None:
        """The stage's published manifest (not its files), None when it is not published."""
        if self.blobs is None:
            try:
                return read_manifest(self.stage_dir(run_id, stage))
            except IntegrityError:
                return None
        try:
            blob = self.blobs.get(self._key(run_id, stage, MANIFEST))
        except NotFoundError:
            return None
        where = f"{self.blobs.url}/{self._key(run_id, stage, MANIFEST)}"
        try:
            manifest = StageManifest.from_json(blob.data)
        except (KeyError, ValueError, TypeError) as err:
            raise IntegrityError(f"{where} is unreadable: {err}") from None
        if (manifest.run_id, manifest.stage) != (run_id, stage):
            raise IntegrityError(f"{where} names {manifest.run_id}/{manifest.stage}")
        return manifest

    def fetch(
        self, run_id: str, stage: str, names: Iterable[str] | None = None
    ) -> StageManifest | None:
        """The stage's manifest with ``names`` (all its files when None) verified in the local
        stage dir, downloaded first when the artifacts are in a bucket; None if unpublished."""
        manifest = self.manifest(run_id, stage)
        if manifest is None:
            return None
        wanted = sorted(manifest.files if names is None else names)
        unknown = [n for n in wanted if n not in manifest.files]
        if unknown:
            raise NotFoundError(f"{stage} artifact of run {run_id}", ", ".join(unknown))
        directory = self.stage_dir(run_id, stage)
        if names is None and self.blobs is not None and directory.is_dir():
            for stray in stage_files(directory):  # left by an attempt that did not publish
                if stray.relative_to(directory).as_posix() not in manifest.files:
                    stray.unlink()
        for name in wanted:
            self._ensure(manifest, name, directory / name)
        if self.blobs is not None:  # beside the files it vouches for (a report reads results)
            write_atomic(directory / MANIFEST, manifest.to_json().encode())
        return manifest

    def _object(self, manifest: StageManifest, name: str) -> str:
        """The key of a published file: under its attempt (older uploads: beside the manifest)."""
        attempt = (manifest.attempt,) if manifest.attempt else ()
        return self._key(manifest.run_id, manifest.stage, *attempt, *name.split("/"))

    def _ensure(self, manifest: StageManifest, name: str, path: Path) -> None:
        expected = manifest.files[name]
        if path.is_file() and sha256_file(path) == expected:
            return
        if self.blobs is None:
            raise IntegrityError(
                f"{path}: missing or sha256 != its {manifest.stage} manifest's {expected}"
            )
        key = self._object(manifest, name)
        self.blobs.get_file(key, path)
        actual = sha256_file(path)
        if actual != expected:
            path.unlink()
            raise IntegrityError(
                f"{self.blobs.url}/{key}: sha256 {actual} != its manifest's {expected}; the "
                "object was changed after publication"
            )

    def fetch_run(self, run_id: str, stages: Iterable[str]) -> list[str]:
        """Every published stage of ``stages`` into the cache (a worker's inputs)."""
        return [s for s in stages if self.fetch(run_id, s) is not None]

    def fetch_small(self, run_id: str, stages: Iterable[str]) -> None:
        """The published stages' files but tensors (``*.safetensors``): what a report shows."""
        for stage in stages:
            manifest = self.manifest(run_id, stage)
            if manifest is not None:
                small = [n for n in manifest.files if not n.endswith(".safetensors")]
                self.fetch(run_id, stage, small)

    # -- writing -----------------------------------------------------------------------------
    def publish_stage(self, run_id: str, stage: str) -> StageManifest:
        """Upload a verified local stage dir: files under a fresh attempt, then the manifest
        (create-only). When another attempt published the stage first, its manifest is kept
        and returned, its files replace ours here, and our upload is deleted."""
        directory = self.stage_dir(run_id, stage)
        manifest = verify(directory)
        if self.blobs is None:
            return manifest
        mine = replace(manifest, attempt=uuid.uuid4().hex[:12])
        for name in mine.files:
            self.blobs.put_file(self._object(mine, name), directory / name)
        try:
            key = self._key(run_id, stage, MANIFEST)
            self.blobs.put(key, mine.to_json().encode(), if_none_match=True)
        except ConflictError:
            return self._lost(mine)
        write_atomic(directory / MANIFEST, mine.to_json().encode())
        log.info("run %s: %s published to %s", run_id, stage, self.blobs.url)
        return mine

    def _lost(self, mine: StageManifest) -> StageManifest:
        assert self.blobs is not None
        log.info("run %s: %s was published by another attempt; keeping it", mine.run_id, mine.stage)
        for name in mine.files:
            self.blobs.delete(self._object(mine, name))
        _replace_dir(self.stage_dir(mine.run_id, mine.stage))
        theirs = self.fetch(mine.run_id, mine.stage)
        if theirs is None:
            raise IntegrityError(f"{self.location}: {mine.stage} of {mine.run_id} vanished")
        return theirs

    def publish_file(self, run_id: str, name: str) -> None:
        """Upload a file serve wrote at the top of the run dir (the slice)."""
        if self.blobs is not None:
            key = self._key(run_id, *name.split("/"))
            self.blobs.put_file(key, self.run_dir(run_id) / name)

    def fetch_file(self, run_id: str, name: str, sha256: str = "") -> Path | None:
        """A file serve wrote in the run dir (the slice, region labels) in the local cache,
        checked against ``sha256`` when given (the recipe's); None when there is none."""
        path = self.run_dir(run_id) / name
        fresh = bool(sha256) and path.is_file() and sha256_file(path) == sha256
        if self.blobs is not None and not fresh:
            try:
                self.blobs.get_file(self._key(run_id, *name.split("/")), path)
            except NotFoundError:
                return None
        if not path.is_file():
            return None
        if sha256 and sha256_file(path) != sha256:
            raise IntegrityError(f"{path}: sha256 differs from the run's recipe ({sha256})")
        return path

    # -- a person's Defuse region labels (written where serve, the UI or the CLI runs) ---------
    def label_files(self, run_id: str) -> list[str]:
        run = self.run_dir(run_id)
        return [p.relative_to(run).as_posix() for p in (labels_path(run), done_path(run))]

    def fetch_regions(self, run_id: str) -> None:
        """A run's regions, their sample grids and the labels given so far (bucket only)."""
        if self.blobs is None:
            return
        self.fetch_small(run_id, ["synthesize"])
        for name in self.label_files(run_id):
            self.fetch_file(run_id, name)

    def publish_labels(self, run_id: str) -> None:
        """The labels (and the 'done' mark) as they are here, for the train stage and others."""
        for name in self.label_files(run_id):
            if (self.run_dir(run_id) / name).is_file():
                self.publish_file(run_id, name)


def _replace_dir(directory: Path) -> None:
    aside = directory.with_name(f".bad-{directory.name}-{uuid.uuid4().hex[:8]}")
    directory.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)

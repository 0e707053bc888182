"""The model registry: content-addressed versions and one atomic production pointer per model.

Layout (backups: docs/operating.md)::

    <root>/<model>/versions/<sha256>/model.safetensors, manifest.json, report.json, report.html
    <root>/<model>/production.json   {schema, sha256, promoted_at, approved_by, previous, epoch}

Crash safety:

- A version is built in a temp dir beside ``versions/<sha256>`` (same filesystem), every file is
  fsynced, the dir is fsynced, renamed into place, and ``versions/`` is fsynced. A reader sees the
  version complete or not at all; a crash leaves only a ``.tmp-*`` dir that :meth:`Registry.gc`
  removes.
- The pointer is written to a temp file, fsynced, ``os.replace``d over ``production.json`` and the
  model dir fsynced, so a reader sees the old pointer or the new one, never a partial one. The
  pointer is written only after the version it names is published.
- Pointer changes of one model are serialized across processes with ``fcntl.flock`` on
  ``<model>/.lock`` and are compare-and-swap (``expect``), so two writers cannot both win.
- The pointer records the leader epoch of the serve replica that wrote it (``epoch``); a
  promote or rollback carrying a lower epoch than the pointer's is refused under the lock, so a
  paused ex-leader cannot switch production after a newer leader did (:mod:`patchd.leader`).

In a bucket (``registry.root: s3://bucket/prefix``, :mod:`patchd.store.blobs`) the layout is the
same, the local ``root`` is a cache, and the guarantees hold without a shared filesystem:

- publishing uploads a version's files first and its ``manifest.json`` last; a reader fetches the
  manifest, downloads the files into the cache and checks each sha256 before using any of them.
- the pointer switch is a conditional put on ``<model>/production.json``: ``If-Match`` the etag
  that was read (``If-None-Match: *`` for the first one). The local lock serializes only one
  machine's writers; across machines a lost race is a :class:`ConflictError` (re-read and retry),
  never a torn pointer. The epoch check is made on the pointer whose etag the put names, so a
  fenced ex-leader cannot win by racing either.

Torch-free: weights are hashed and copied as bytes (hashlib); nothing here unpickles anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.digests import CHUNK, sha256_file
from patchd.exceptions import ConflictError, IntegrityError, NotFoundError, ValidationError
from patchd.store.blobs import BlobStore, fsync_dir, open_blobs, write_atomic

if TYPE_CHECKING:
    from patchd.config import Config

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = 1
POINTER_SCHEMA = 1
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
POINTER = "production.json"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def check_digest(sha256: str) -> str:
    if not _SHA_RE.match(sha256 or ""):
        raise ValidationError(
            "bad_digest", f"{sha256!r} is not a sha256 hex digest (64 lowercase hex characters)"
        )
    return sha256


def check_model_name(model: str) -> str:
    if not _MODEL_RE.match(model or ""):
        raise ValidationError(
            "bad_model", f"model name {model!r} must match {_MODEL_RE.pattern} (no slashes)"
        )
    return model


def _dump(record: Any) -> bytes:
    return json.dumps(asdict(record), indent=2, sort_keys=True).encode()


def _load(raw: bytes | str, schema: int, what: str) -> dict[str, Any]:
    """The JSON object of a manifest or pointer; IntegrityError when its schema differs."""
    data: dict[str, Any] = json.loads(raw)
    if data.get("schema") != schema:
        raise IntegrityError(f"{what} schema {data.get('schema')!r} is not {schema}")
    return data


@dataclass(frozen=True)
class VersionManifest:
    """What a version is and where it came from (``manifest.json``)."""

    model: str
    sha256: str
    parent: str | None = None  # digest of the model this one was patched from
    run_id: str | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    data_digests: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None  # per-group accuracy + CIs, worst-group, average
    gate: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256 of every file but this
    created_at: float = field(default_factory=time.time)
    schema: int = MANIFEST_SCHEMA

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> VersionManifest:
        return cls(**_load(raw, MANIFEST_SCHEMA, "manifest"))


@dataclass(frozen=True)
class Pointer:
    """The content of ``production.json``."""

    sha256: str
    promoted_at: float
    approved_by: str
    previous: str | None = None
    action: str = "promote"  # promote | import | rollback
    schema: int = POINTER_SCHEMA
    # leader epoch of the serve replica that wrote it (patchd.leader); None: no leader (CLI)
    epoch: int | None = None

    def to_json(self) -> bytes:
        return _dump(self)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Pointer:
        return cls(**_load(raw, POINTER_SCHEMA, "pointer"))


@dataclass(frozen=True)
class ModelVersion:
    model: str
    sha256: str
    path: Path  # the version dir
    manifest: VersionManifest

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def verify(self) -> None:
        """Raise :class:`IntegrityError` unless every recorded file matches its sha256."""
        actual = sha256_file(self.weights_path)
        if actual != self.sha256:
            raise IntegrityError(
                f"{self.weights_path} has sha256 {actual}, expected {self.sha256}: the file was "
                "changed after publication; re-import or roll back"
            )
        for name, expected in self.manifest.files.items():
            if name != WEIGHTS and sha256_file(self.path / name) != expected:
                raise IntegrityError(f"{self.path / name} does not match its manifest sha256")


def open_registry(config: Config) -> Registry:
    """The configured registry: a directory, or a bucket cached under ``registry_root``."""
    url = config.registry_url
    blobs = open_blobs(url, config.registry.storage_options) if url else None
    return Registry(config.registry_root, blobs)


class Registry:
    """Versions and production pointers under ``root`` (see the module docstring); with
    ``blobs``, the versions and pointers live there and ``root`` is the local cache."""

    def __init__(self, root: Path, blobs: BlobStore | None = None) -> None:
        self.root = Path(root)
        self.blobs = blobs

    @property
    def location(self) -> str:
        return self.blobs.url if self.blobs is not None else str(self.root)

    def _key(self, model: str, *parts: str) -> str:
        return "/".join((check_model_name(model), *parts))

    # -- paths ---------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.root / check_model_name(model)

    def version_dir(self, model: str, sha256: str) -> Path:
        return self.model_dir(model) / "versions" / check_digest(sha256)

    def pointer_path(self, model: str) -> Path:
        return self.model_dir(model) / POINTER

    def models(self) -> list[str]:
        if self.blobs is not None:
            folders = self.blobs.folders("")  # not .patchd-probe (patchd.store.blobs)
            return [n for n in folders if _MODEL_RE.match(n) and not n.startswith(".")]
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _MODEL_RE.match(p.name))

    # -- versions ------------------------------------------------------------------------------
    def get(self, model: str, sha256: str) -> ModelVersion:
        path = self.version_dir(model, sha256)
        if self.blobs is not None:
            self._pull(model, sha256, path)
        try:
            manifest = VersionManifest.from_json((path / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise NotFoundError("model version", f"{model}@{sha256}") from None
        return ModelVersion(model, sha256, path, manifest)

    def manifest(self, model: str, sha256: str) -> VersionManifest:
        """A version's manifest alone (nothing downloaded but it)."""
        try:
            if self.blobs is not None:
                raw = self.blobs.get(self._key(model, "versions", check_digest(sha256), MANIFEST))
                return VersionManifest.from_json(raw.data)
            return VersionManifest.from_json(
                (self.version_dir(model, sha256) / MANIFEST).read_bytes()
            )
        except (NotFoundError, FileNotFoundError):
            raise NotFoundError("model version", f"{model}@{sha256}") from None

    def versions(self, model: str) -> list[ModelVersion]:
        """Every published version, oldest first (from a bucket: manifests only, not fetched)."""
        if self.blobs is not None:
            return sorted(self._remote_versions(model), key=lambda v: v.manifest.created_at)
        vdir = self.model_dir(model) / "versions"
        if not vdir.is_dir():
            return []
        found = [self.get(model, p.name) for p in vdir.iterdir() if _SHA_RE.match(p.name)]
        return sorted(found, key=lambda v: v.manifest.created_at)

    def publish(
        self,
        model: str,
        weights_path: Path,
        manifest: VersionManifest | None = None,
        extra_files: Mapping[str, bytes] | None = None,
    ) -> ModelVersion:
        """Publish ``weights_path`` (+ extra files such as reports) as a version, atomically.

        Idempotent: publishing bytes that are already a version returns it (extra files are
        replaced atomically one by one).
        """
        sha = sha256_file(weights_path)
        extras = dict(extra_files or {})
        base = manifest or VersionManifest(model=model, sha256=sha)
        if base.sha256 != sha or base.model != model:
            raise IntegrityError(
                f"manifest names {base.model}@{base.sha256} but {weights_path} is {model}@{sha}"
            )
        final = self.version_dir(model, sha)
        if final.is_dir():
            return self._republish(model, sha, extras)
        self._ensure_dirs(final.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:16]}-", dir=final.parent))
        try:
            self._fill(tmp, weights_path, sha, base, extras)
            try:
                os.rename(tmp, final)
            except OSError:  # somebody else published the same bytes meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                return self._republish(model, sha, extras)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(final.parent)
        self._push(model, sha, final)
        log.info("published %s@%s to %s", model, sha[:12], self.location)
        return self.get(model, sha)

    def _fill(
        self, tmp: Path, weights: Path, sha: str, base: VersionManifest, extras: dict[str, bytes]
    ) -> None:
        copied = _copy_fsync(weights, tmp / WEIGHTS)
        if copied != sha:
            raise IntegrityError(f"{weights} changed while it was being published")
        files = {WEIGHTS: sha}
        for name, data in extras.items():
            _write_fsync(tmp / _safe_name(name), data)
            files[name] = hashlib.sha256(data).hexdigest()
        manifest = VersionManifest(**{**asdict(base), "files": {**base.files, **files}})
        _write_fsync(tmp / MANIFEST, manifest.to_json())
        fsync_dir(tmp)

    def _republish(self, model: str, sha: str, extras: dict[str, bytes]) -> ModelVersion:
        if (
            self.blobs is not None
            and self.blobs.etag(self._key(model, "versions", sha, MANIFEST)) is None
        ):
            self._push(model, sha, self.version_dir(model, sha))  # the upload was cut short
        version = self.get(model, sha)
        version.verify()
        if extras:
            self.write_files(model, sha, extras)
        return self.get(model, sha)

    def write_files(self, model: str, sha256: str, files: Mapping[str, bytes]) -> None:
        """Atomically add or replace files (reports) of a published version and its manifest."""
        version = self.get(model, sha256)
        digests = dict(version.manifest.files)
        for name, data in files.items():
            if _safe_name(name) in (WEIGHTS, MANIFEST):
                raise ValidationError("bad_name", f"{name} cannot be replaced in a version")
            write_atomic(version.path / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()
        manifest = VersionManifest(**{**asdict(version.manifest), "files": digests})
        write_atomic(version.path / MANIFEST, manifest.to_json())
        if self.blobs is not None:
            for name in files:
                self.blobs.put_file(self._key(model, "versions", sha256, name), version.path / name)
            self.blobs.put(self._key(model, "versions", sha256, MANIFEST), manifest.to_json())

    def _ensure_dirs(self, versions: Path) -> None:
        for path in (self.root, versions.parent, versions):
            if not path.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                fsync_dir(path.parent)

    # -- the pointer ---------------------------------------------------------------------------
    def pointer(self, model: str) -> Pointer | None:
        return self._read_pointer(model)[0]

    def _read_pointer(self, model: str) -> tuple[Pointer | None, str | None]:
        """The pointer and the etag a conditional put must name (None, None: no pointer)."""
        if self.blobs is None:
            try:
                return Pointer.from_json(self.pointer_path(model).read_bytes()), None
            except FileNotFoundError:
                return None, None
        try:
            blob = self.blobs.get(self._key(model, POINTER))
        except NotFoundError:
            return None, None
        return Pointer.from_json(blob.data), blob.etag

    def _write_pointer(self, model: str, pointer: Pointer, etag: str | None) -> None:
        """Replace the pointer atomically; in a bucket only if it still has ``etag``."""
        if self.blobs is not None:
            try:
                self.blobs.put(
                    self._key(model, POINTER),
                    pointer.to_json(),
                    if_none_match=etag is None,
                    if_match=etag,
                )
            except ConflictError:
                raise ConflictError(
                    f"production of {model} at {self.location} changed meanwhile (another "
                    "serve or CLI switched it first); nothing changed here: re-read and retry"
                ) from None
        self.model_dir(model).mkdir(parents=True, exist_ok=True)
        write_atomic(self.pointer_path(model), pointer.to_json())  # local copy / cache

    def production(self, model: str, verify: bool = True) -> ModelVersion | None:
        """The production version (weights sha256 checked when ``verify``), None if none yet."""
        pointer = self.pointer(model)
        if pointer is None:
            return None
        version = self.get(model, pointer.sha256)
        if verify:
            version.verify()
        return version

    @contextlib.contextmanager
    def locked(self, model: str) -> Iterator[None]:
        """Exclusive cross-process lock on one model's pointer."""
        mdir = self.model_dir(model)
        mdir.mkdir(parents=True, exist_ok=True)
        with open(mdir / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def promote(
        self,
        model: str,
        sha256: str,
        approved_by: str,
        expect: str | None | object = ...,
        epoch: int | None = None,
    ) -> Pointer:
        """Switch production to ``sha256``; ``expect`` (a digest or None) makes it a CAS;
        ``epoch`` (a serve leader's) must not be below the pointer's."""
        version = self.get(model, sha256)
        version.verify()
        with self.locked(model):
            current, etag = self._read_pointer(model)
            _check_epoch(model, current, epoch, "promote")
            current_sha = current.sha256 if current else None
            if expect is not ... and expect != current_sha:
                raise ConflictError(
                    f"production of {model} is {_short(current_sha)}, expected {_short(expect)}: "
                    "it changed meanwhile; re-read and retry"
                )
            if current_sha == sha256:
                raise ConflictError(f"{model}@{sha256[:12]} is already in production")
            pointer = Pointer(
                sha256,
                time.time(),
                approved_by,
                current_sha,
                "promote",
                epoch=_next_epoch(current, epoch),
            )
            self._write_pointer(model, pointer, etag)
        log.info(
            "promoted %s to %s (previous %s) by %s",
            model,
            sha256[:12],
            _short(current_sha),
            approved_by,
        )
        return pointer

    def rollback(
        self, model: str, by: str, expect: str | None = None, epoch: int | None = None
    ) -> Pointer:
        """One step back: production becomes the pointer's ``previous`` (which is then cleared)."""
        with self.locked(model):
            current, etag = self._read_pointer(model)
            _check_epoch(model, current, epoch, "roll back")
            if current is None or current.previous is None:
                raise ConflictError(
                    f"{model} has no previous production version to roll back to "
                    "(rollback is one step; promote a version instead)"
                )
            if expect is not None and expect != current.sha256:
                raise ConflictError(
                    f"production of {model} is {current.sha256[:12]}, not {expect[:12]}: "
                    "it changed meanwhile; nothing rolled back"
                )
            self.get(model, current.previous).verify()
            pointer = Pointer(
                current.previous,
                time.time(),
                by,
                None,
                "rollback",
                epoch=_next_epoch(current, epoch),
            )
            self._write_pointer(model, pointer, etag)
        log.info(
            "rolled back %s from %s to %s by %s",
            model,
            current.sha256[:12],
            current.previous[:12],
            by,
        )
        return pointer

    def import_model(self, model: str, weights_path: Path, approved_by: str) -> ModelVersion:
        """Publish an existing safetensors file and make it production (first version)."""
        if not Path(weights_path).is_file():
            raise NotFoundError("weights file", str(weights_path))
        sha = sha256_file(weights_path)
        manifest = VersionManifest(model=model, sha256=sha, recipe={"imported": str(weights_path)})
        version = self.publish(model, Path(weights_path), manifest)
        with self.locked(model):
            current, etag = self._read_pointer(model)
            if current is not None and current.sha256 == sha:
                return version
            pointer = Pointer(
                sha,
                time.time(),
                approved_by,
                current.sha256 if current else None,
                "import",
                epoch=_next_epoch(current, None),
            )
            self._write_pointer(model, pointer, etag)
        log.info("imported %s@%s as production by %s", model, sha[:12], approved_by)
        return version

    # -- garbage collection ----------------------------------------------------------------------
    def gc(
        self, model: str, keep: int, protect: set[str] | frozenset[str] = frozenset()
    ) -> list[str]:
        """Delete old versions beyond the newest ``keep``; never production, its previous or
        ``protect`` (pending candidates). Also removes leftover temp dirs. Returns removed digests.
        """
        with self.locked(model):
            pointer = self.pointer(model)
            keep_set = set(protect)
            if pointer is not None:
                keep_set |= {pointer.sha256, pointer.previous} - {None}  # type: ignore[arg-type]
            newest_first = list(reversed(self.versions(model)))
            doomed = [v for v in newest_first[keep:] if v.sha256 not in keep_set]
            for version in doomed:
                self._remove_remote(model, version)
                if version.path.is_dir():
                    _remove_dir(version.path)
            self._clear_tmp(model)
        if doomed:
            log.info("gc removed %d versions of %s", len(doomed), model)
        return [v.sha256 for v in doomed]

    def _clear_tmp(self, model: str) -> None:
        vdir = self.model_dir(model) / "versions"
        for path in vdir.glob(".tmp-*") if vdir.is_dir() else ():
            shutil.rmtree(path, ignore_errors=True)
        for path in self.model_dir(model).glob(".tmp-*"):
            with contextlib.suppress(OSError):
                path.unlink()

    # -- the bucket (``blobs``) -----------------------------------------------------------------
    def _push(self, model: str, sha: str, path: Path) -> None:
        """Upload a published local version: its files, then its manifest (create-only)."""
        if self.blobs is None:
            return
        manifest = VersionManifest.from_json((path / MANIFEST).read_bytes())
        for name in manifest.files:
            self.blobs.put_file(self._key(model, "versions", sha, name), path / name)
        with contextlib.suppress(ConflictError):  # the same bytes were published meanwhile
            self.blobs.put(
                self._key(model, "versions", sha, MANIFEST),
                (path / MANIFEST).read_bytes(),
                if_none_match=True,
            )

    def _pull(self, model: str, sha: str, path: Path) -> None:
        """Make the cache's copy of a version the bucket's: manifest first, each file checked
        against it, the complete dir renamed into place (NotFoundError if unpublished). When
        the manifest changed while its files were read (a report rewritten), read it again."""
        for attempt in (1, 2):
            raw = self._remote_manifest(model, sha)
            if (path / MANIFEST).is_file() and (path / MANIFEST).read_bytes() == raw:
                return
            try:
                self._pull_once(model, sha, path, raw)
                return
            except IntegrityError:
                if attempt == 2 or self._remote_manifest(model, sha) == raw:
                    raise
                log.info("manifest of %s@%s changed while fetching; again", model, sha[:12])

    def _remote_manifest(self, model: str, sha: str) -> bytes:
        assert self.blobs is not None
        try:
            return self.blobs.get(self._key(model, "versions", sha, MANIFEST)).data
        except NotFoundError:
            raise NotFoundError("model version", f"{model}@{sha} in {self.location}") from None

    def _pull_once(self, model: str, sha: str, path: Path, raw: bytes) -> None:
        manifest = VersionManifest.from_json(raw)
        self._ensure_dirs(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:16]}-", dir=path.parent))
        try:
            for name, expected in manifest.files.items():
                cached = path / _safe_name(name)
                if cached.is_file() and sha256_file(cached) == expected:
                    _copy_fsync(cached, tmp / name)  # unchanged since the last fetch
                else:
                    self._fetch_file(model, sha, name, expected, tmp / name)
            _write_fsync(tmp / MANIFEST, raw)
            if path.is_dir():
                _remove_dir(path)
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(path.parent)
        log.info("fetched %s@%s from %s", model, sha[:12], self.location)

    def _fetch_file(self, model: str, sha: str, name: str, expected: str, dest: Path) -> None:
        assert self.blobs is not None
        self.blobs.get_file(self._key(model, "versions", sha, name), dest)
        actual = sha256_file(dest)
        if actual != expected:
            raise IntegrityError(
                f"{self.location}/{self._key(model, 'versions', sha, name)} has sha256 "
                f"{actual}, its manifest says {expected}: changed after publication"
            )

    def _remote_versions(self, model: str) -> list[ModelVersion]:
        assert self.blobs is not None
        found = []
        for sha in self.blobs.folders(self._key(model, "versions")):
            if not _SHA_RE.match(sha):
                continue
            try:
                manifest = self.manifest(model, sha)
            except NotFoundError:  # files without a manifest: not published (yet)
                continue
            found.append(ModelVersion(model, sha, self.version_dir(model, sha), manifest))
        return found

    def _remove_remote(self, model: str, version: ModelVersion) -> None:
        """Delete a version from the bucket: the manifest first, so it is never half there."""
        if self.blobs is None:
            return
        self.blobs.delete(self._key(model, "versions", version.sha256, MANIFEST))
        for name in version.manifest.files:
            self.blobs.delete(self._key(model, "versions", version.sha256, name))


def _remove_dir(path: Path) -> None:
    """Rename out of the way first so a half-deleted version is never visible under its name."""
    grave = path.with_name(f".tmp-gc-{path.name}")
    os.rename(path, grave)
    fsync_dir(path.parent)
    shutil.rmtree(grave, ignore_errors=True)


def _copy_fsync(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(CHUNK), b""):
            digest.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def _write_fsync(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _safe_name(name: str) -> str:
    if "/" in name or name.startswith(".") or not name:
        raise ValidationError("bad_name", f"file name {name!r} must be a plain name")
    return name


def _short(sha: object) -> str:
    return sha[:12] if isinstance(sha, str) else "none"


def _check_epoch(model: str, current: Pointer | None, epoch: int | None, verb: str) -> None:
    """ConflictError when a leader of an older epoch than the pointer's wants to change it."""
    if epoch is None or current is None or current.epoch is None or epoch >= current.epoch:
        return
    log.error(
        "fenced: %s %s refused: leader epoch %d is older than the pointer's %d",
        verb,
        model,
        epoch,
        current.epoch,
    )
    raise ConflictError(
        f"cannot {verb} {model}: this serve's leader epoch {epoch} is older than the epoch "
        f"{current.epoch} that wrote the production pointer (a newer leader took over)"
    )


def _next_epoch(current: Pointer | None, epoch: int | None) -> int | None:
    """The epoch a new pointer records: the writer's, never below the one it replaces."""
    known = [e for e in (epoch, current.epoch if current else None) if e is not None]
    return max(known) if known else None

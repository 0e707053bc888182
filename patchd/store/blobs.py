"""Blob stores: named byte objects in a local directory or an S3-API bucket, one interface.

A key is a relative posix name (``runs/r-1/train/model.safetensors``); ``..``, empty segments
and a leading ``/`` are refused. Two implementations:

- :class:`LocalBlobs` (a directory): every put writes a temp file beside the target, fsyncs it,
  ``os.replace``s it into place and fsyncs the directory, so a reader sees the old bytes or the
  new ones. The etag is the content's sha256; conditional puts compare it under ``fcntl.flock``.
- :class:`S3Blobs` (``s3://bucket/prefix``, through s3fs, imported only when such a URL is
  opened): a put is one ``PutObject`` (S3 makes a whole object visible at once, large files go
  up as one multipart upload that completes atomically). The etag is S3's.

Conditional puts are the compare-and-swap the registry pointer and manifest publication rely
on: ``if_none_match=True`` creates only when the key is absent, ``if_match=etag`` replaces only
when the object still has that etag (S3's ``If-None-Match: *`` / ``If-Match``). A lost race is a
:class:`ConflictError`, never a torn object.

Credentials: ``storage_options`` name the environment variables or the file that hold the key
and secret; they are read when the store is opened and never logged or stored in the config.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from patchd.digests import CHUNK
from patchd.exceptions import ConfigError, ConflictError, NotFoundError, ValidationError

if TYPE_CHECKING:
    from patchd.config import StorageOptions

log = logging.getLogger(__name__)

SCHEMES = ("s3",)
PROBE_PREFIX = ".patchd-probe"  # where the conditional-write check puts (and deletes) a key
_CONDITIONAL_OK: set[str] = set()  # bucket URLs this process has checked


@dataclass(frozen=True)
class Blob:
    data: bytes
    etag: str


class BlobStore(Protocol):
    """What the artifacts and the registry need of a place to keep files."""

    url: str  # where it is, for messages (no credentials)

    def get(self, key: str) -> Blob: ...  # NotFoundError when absent
    def etag(self, key: str) -> str | None: ...  # None when absent
    def put(self, key: str, data: bytes, *, if_none_match: bool = False,
            if_match: str | None = None) -> str: ...  # fmt: skip
    def put_file(self, key: str, path: Path) -> str: ...
    def get_file(self, key: str, dest: Path) -> None: ...  # atomic; NotFoundError when absent
    def folders(self, prefix: str) -> list[str]: ...  # names one level below ``prefix``
    def list(self, prefix: str) -> list[str]: ...  # keys under ``prefix`` (sorted)
    def delete(self, key: str) -> None: ...  # absent is fine


def check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValidationError("bad_key", f"blob key {key!r} must be a relative name without '..'")
    return key


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


def open_blobs(location: str | Path, options: StorageOptions | None = None) -> BlobStore:
    """The store at ``location``: a directory, or ``s3://bucket[/prefix]``."""
    if not is_url(location):
        return LocalBlobs(Path(location))
    return S3Blobs.open(str(location), options)


# --- a local directory ------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename or creation inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(dest: Path) -> Iterator[BinaryIO]:
    """A temp file beside ``dest`` to write; on success fsynced and ``os.replace``d onto
    ``dest`` (the directory fsynced too), on any failure removed: nothing half-written stays."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _replace_from(tmp, dest)


def _replace_from(tmp: str, dest: Path) -> None:
    """``os.replace`` ``tmp`` onto ``dest`` and fsync the directory (``tmp`` removed on failure)."""
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(dest.parent)


def write_atomic(dest: Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically and durably (:func:`_replacing`)."""
    with _replacing(dest) as fh:
        fh.write(data)


def copy_atomic(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` the same way; returns the sha256 of what was copied."""
    digest = hashlib.sha256()
    with _replacing(dest) as fout, open(src, "rb") as fin:
        for chunk in iter(lambda: fin.read(CHUNK), b""):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


class LocalBlobs:
    """Blobs as files under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".blobs.lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def get(self, key: str) -> Blob:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFoundError("blob", f"{self.url}/{key}") from None
        return Blob(data, _sha256(data))

    def etag(self, key: str) -> str | None:
        path = self._path(key)
        return _sha256(path.read_bytes()) if path.is_file() else None

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        path = self._path(key)
        if not if_none_match and if_match is None:
            write_atomic(path, data)
            return _sha256(data)
        with self._locked():
            _check_precondition(self.url, key, self.etag(key), if_none_match, if_match)
            write_atomic(path, data)
        return _sha256(data)

    def put_file(self, key: str, path: Path) -> str:
        return copy_atomic(Path(path), self._path(key))

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFoundError("blob", f"{self.url}/{key}")
        copy_atomic(src, Path(dest))

    def folders(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not any(s.startswith(".") for s in k.split("/")))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def _check_precondition(
    url: str, key: str, current: str | None, if_none_match: bool, if_match: str | None
) -> None:
    if if_none_match and current is not None:
        raise ConflictError(f"{url}/{key} already exists (create-only put lost the race)")
    if if_match is not None and current != if_match:
        raise ConflictError(
            f"{url}/{key} changed meanwhile (etag {current or 'absent'}, expected {if_match})"
        )


# --- an S3-API bucket -------------------------------------------------------------------------

# S3's answers to a failed precondition: 412, or 409 when a concurrent conditional write is
# still in flight on the same key
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


def _error_code(err: BaseException) -> str | None:
    cause = err.__cause__ if err.__cause__ is not None else err
    response = getattr(cause, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code"))
    return None


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of ``s3://bucket[/prefix]``; ConfigError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise ConfigError(f"{url!r} is not an s3://bucket[/prefix] URL")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{url!r}: put credentials in storage_options, not in the URL")
    return parts.netloc, parts.path.strip("/")


class S3Blobs:
    """Blobs as objects under ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(self, fs: Any, bucket: str, prefix: str) -> None:
        self.fs = fs
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")

    @classmethod
    def open(cls, url: str, options: StorageOptions | None) -> S3Blobs:
        bucket, prefix = parse_s3_url(url)
        try:
            import s3fs
        except ImportError:
            raise ConfigError(
                f"{url} needs s3fs: pip install 'patchd[s3]' (or use a local path)"
            ) from None
        kwargs = options.s3fs_kwargs() if options is not None else {}
        # fsspec keeps one client per set of arguments (and per process: a fork starts anew),
        # so opening the store per use does not leak connections; no cached listings: another
        # machine writes the same bucket
        store = cls(s3fs.S3FileSystem(use_listings_cache=False, **kwargs), bucket, prefix)
        store.check_conditional_writes()
        return store

    def check_conditional_writes(self) -> None:
        """ConfigError unless the server refuses a create-only put of an existing key: a server
        that ignores ``If-None-Match`` / ``If-Match`` would make every compare-and-swap a blind
        overwrite. Checked once per bucket URL and process (two puts and a delete)."""
        if self.url in _CONDITIONAL_OK:
            return
        key = f"{PROBE_PREFIX}/{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            self.put(key, b"1", if_none_match=True)
            self.put(key, b"2", if_none_match=True)
        except ConflictError:
            _CONDITIONAL_OK.add(self.url)
            return
        finally:
            self.delete(key)
        raise ConfigError(
            f"{self.url} does not enforce conditional writes (a second If-None-Match: * put of "
            "one key succeeded); patchd's manifests and production pointer need them: use AWS "
            "S3 or a server that supports them (recent MinIO, Ceph RGW), or a local path"
        )

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, method: str, key: str, **kwargs: Any) -> Any:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self._key(key), **kwargs)
        except FileNotFoundError:
            raise NotFoundError("blob", f"{self.url}/{key}") from None

    def get(self, key: str) -> Blob:
        from fsspec.asyn import sync

        async def read() -> Blob:
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(key))
            except FileNotFoundError:
                raise NotFoundError("blob", f"{self.url}/{key}") from None
            async with resp["Body"] as body:
                return Blob(await body.read(), str(resp["ETag"]))

        result: Blob = sync(self.fs.loop, read)
        return result

    def etag(self, key: str) -> str | None:
        try:
            return str(self._call("head_object", key)["ETag"])
        except NotFoundError:
            return None

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        match: dict[str, str] = {}
        if if_none_match:
            match["IfNoneMatch"] = "*"
        if if_match is not None:
            match["IfMatch"] = if_match
        try:
            resp = self._call("put_object", key, Body=data, **match)
        except OSError as err:
            if match and _error_code(err) in _CONFLICT_CODES:
                raise ConflictError(
                    f"{self.url}/{key} changed meanwhile or already exists "
                    f"({_error_code(err)}): the conditional put lost the race"
                ) from None
            raise
        return str(resp["ETag"])

    def put_file(self, key: str, path: Path) -> str:
        self.fs.put_file(str(path), f"{self.bucket}/{self._key(key)}")
        return self.etag(key) or ""

    def get_file(self, key: str, dest: Path) -> None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{dest.name}-", dir=dest.parent)
        os.close(fd)
        try:
            self.fs.get_file(f"{self.bucket}/{self._key(key)}", tmp)
        except FileNotFoundError:
            os.unlink(tmp)
            raise NotFoundError("blob", f"{self.url}/{key}") from None
        except BaseException:
            os.unlink(tmp)
            raise
        _replace_from(tmp, dest)

    def _pages(self, prefix: str, **kwargs: str) -> Iterator[dict[str, Any]]:
        base = self._key(prefix.rstrip("/")) + "/" if prefix else self._key_root()
        token: dict[str, str] = {}
        while True:
            resp = self.fs.call_s3(
                "list_objects_v2", Bucket=self.bucket, Prefix=base, **kwargs, **token
            )
            yield resp
            if not resp.get("IsTruncated"):
                return
            token = {"ContinuationToken": resp["NextContinuationToken"]}

    def folders(self, prefix: str) -> list[str]:
        pages = self._pages(prefix, Delimiter="/")
        found = (p["Prefix"] for page in pages for p in page.get("CommonPrefixes", []))
        return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in found)

    def list(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = self._pages(prefix)
        return sorted(obj["Key"][strip:] for page in pages for obj in page.get("Contents", []))

    def _key_root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def delete(self, key: str) -> None:
        with contextlib.suppress(NotFoundError):
            self._call("delete_object", key)

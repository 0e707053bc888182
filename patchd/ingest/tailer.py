"""JSONL tail source: follows the files of a glob (``sources.tail``) and ingests each line.

Guarantees:

- **Offsets are durable with the events**: each batch of lines is committed in the same
  transaction as its file's new offset (``source_offsets``), so a restart neither loses nor
  re-counts a line (and ids are de-duplicated anyway).
- **Rotation by rename**: a file is followed by (device, inode), not by name; a renamed file is
  read to its end through the open descriptor while the new file is read from 0. Include the
  rotated names in the glob (``app.log*``; BentoML: ``data.*.log*``) so that a restart during
  rotation still finds them. A file idle for :data:`IDLE_CLOSE_POLLS` polls, or no longer matched,
  is closed and its offset remembered: when it grows (or the glob matches it again) it is read on
  from there, never again from 0. Compressed files (``.gz``, ``.bz2``, ``.xz``, ``.zst``) are
  skipped.
- **Truncation** (copytruncate): a file shorter than the offset, or whose first bytes changed,
  is read again from 0.
- **Partial last line**: only complete lines (ending in ``\\n``) are consumed; the rest waits.
- **Containment**: the glob's fixed prefix must resolve inside ``sources.allowed_roots`` (a
  config error otherwise), and every matched file is resolved (symlinks followed) and skipped
  with a ``path_not_allowed`` rejection when it lies outside the roots. Only regular files.

For ``kind: bentoml`` or ``kind: mapping`` each line is first converted by
``patchd.plugins.sources.mapping:map_record(kind, mapping, raw, zone)`` (imported lazily;
``zone`` from :meth:`TailSourceConfig.zone`). For these kinds an ``input`` that serve cannot use
(not a local path, outside ``sources.allowed_roots``) is dropped and counted
(``patchd_ingest_inputs_dropped_total{source,reason}``): the prediction is kept.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchd.config import Config, TailSourceConfig
from patchd.exceptions import ConfigError, QueueFullError, ValidationError
from patchd.ingest.pipeline import BatchResult, IngestPipeline, OffsetUpdate, ShuttingDownError
from patchd.ingest.records import PLACEHOLDER, RecordError, is_malformed, split_lines
from patchd.store.backend import Store

log = logging.getLogger(__name__)

CHUNK_BYTES = 2 << 20
MAX_LINE_BYTES = 1 << 20
MAX_INFLIGHT = 4
HEAD_BYTES = 128
GONE_POLLS = 3
IDLE_CLOSE_POLLS = 120
SKIP_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
_GLOB_CHARS = frozenset("*?[")


def check_glob(pattern: str, roots: list[Path]) -> Path:
    """The resolved fixed prefix of ``pattern``; ConfigError when it is outside every root."""
    if not roots:
        raise ConfigError("tail sources need sources.allowed_roots (the directories they may read)")
    if not pattern.startswith("/"):
        raise ConfigError(f"{pattern!r} must be an absolute path pattern")
    parts = Path(pattern).parts
    if ".." in parts or "\x00" in pattern:
        raise ConfigError(f"{pattern!r} must not contain '..' or NUL")
    base = Path(os.path.realpath(Path(*_fixed_prefix(parts))))
    resolved = [Path(os.path.realpath(r)) for r in roots]
    if not any(base.is_relative_to(r) for r in resolved):
        raise ConfigError(
            f"{pattern!r} resolves to {str(base)!r}, outside sources.allowed_roots "
            f"{[str(r) for r in resolved]}; add its directory to allowed_roots"
        )
    return base


Mapper = Callable[[str, dict[str, str], Any, str | None], Any]


def _load_mapper() -> Mapper:
    """The capture plugin's ``map_record`` (imported only for bentoml / mapping sources)."""
    try:
        from patchd.plugins.sources.mapping import map_record
    except ImportError as err:
        message = f"tail kind bentoml/mapping needs patchd.plugins.sources.mapping: {err}"
        raise ConfigError(message) from None
    return map_record


def _fixed_prefix(parts: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        out.append(part)
    return out


@dataclass
class _File:
    path: str  # the name it was last seen under
    real: str
    fh: Any  # binary file object
    device: int
    inode: int
    offset: int  # next byte to read
    committed: int  # offset known to be in the store
    head: bytes = b""  # the first bytes, to detect truncate-and-rewrite
    gone: int = 0  # polls since the glob last matched it and nothing was read
    skipping: bool = False  # inside an over-long line: drop bytes until the next newline
    idle: int = 0  # polls in a row that read nothing


class Tailer:
    """Follows one ``sources.tail`` entry in a thread; ``start()``/``stop()``."""

    def __init__(
        self, source: TailSourceConfig, config: Config, pipeline: IngestPipeline, store: Store
    ) -> None:
        self.source = source
        self.name = source.name
        self.pipeline = pipeline
        self.store = store
        self.roots = tuple(Path(os.path.realpath(r)) for r in config.sources.allowed_roots)
        check_glob(source.glob, list(config.sources.allowed_roots))
        self.files: dict[tuple[int, int], _File] = {}
        self._stored: dict[tuple[int, int], int] | None = None  # used by the first scan only
        self._closed: dict[tuple[int, int], tuple[int, bytes]] = {}  # offset, head of closed files
        self._inflight: deque[tuple[Future[BatchResult], _File, int, int]] = deque()
        self._refused: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mapper: Mapper | None = None
        self.zone = source.zone()
        if source.kind != "jsonl":
            self._mapper = _load_mapper()
            self._mapper(source.kind, dict(source.mapping), {}, self.zone)  # a bad mapping fails
        self.lines_read = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stored = self._load_offsets()
        self._thread = threading.Thread(
            target=self._run, name=f"patchd-tail-{self.name}", daemon=True
        )
        self._thread.start()
        log.info("tail %s: following %s", self.name, self.source.glob)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for f in self.files.values():
            f.fh.close()
        self.files.clear()

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "glob": self.source.glob,
            "lines_read": self.lines_read,
            "files": [{"path": f.path, "offset": f.committed} for f in self.files.values()],
        }

    def _load_offsets(self) -> dict[tuple[int, int], int]:
        with self.store.read() as conn:
            rows = conn.execute(
                'SELECT device, inode, "offset" FROM source_offsets WHERE source = ?', (self.name,)
            ).fetchall()
        return {(int(d), int(i)): int(o) for d, i, o in rows}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                progressed = self.poll_once()
            except Exception:
                log.exception("tail %s: poll failed; retrying", self.name)
                progressed = False
            if not progressed:
                self._stop.wait(self.source.poll_interval_s)
        self._drain_inflight()

    # -- one poll ----------------------------------------------------------------------------
    def poll_once(self) -> bool:
        """Scan the glob, read what is new in every file; True when anything was read."""
        seen = self._scan()
        progressed = False
        for key, f in list(self.files.items()):
            if self._stop.is_set():
                break
            read = self._read(f)
            progressed |= read
            f.gone = 0 if (key in seen or read) else f.gone + 1
            f.idle = 0 if read else f.idle + 1
            if f.gone >= GONE_POLLS and not read:
                log.info("tail %s: %s rotated away and read to its end", self.name, f.path)
                self._close(key, f)
            elif f.idle >= IDLE_CLOSE_POLLS:
                self._close(key, f)
        self._collect()
        return progressed

    def _close(self, key: tuple[int, int], f: _File) -> None:
        """Close a drained file, remembering where it ended (a later match reads on from there)."""
        if any(item[1] is f for item in self._inflight):
            return  # its last batch may still be re-read
        self._closed[key] = (f.offset, f.head)
        f.fh.close()
        del self.files[key]

    def _scan(self) -> set[tuple[int, int]]:
        seen: set[tuple[int, int]] = set()
        for path in sorted(glob.glob(self.source.glob)):
            if path.endswith(SKIP_SUFFIXES):
                continue
            key = self._track(path)
            if key is not None:
                seen.add(key)
        self._stored = None  # stored offsets apply to files present at startup only
        return seen

    def _track(self, path: str) -> tuple[int, int] | None:
        real = os.path.realpath(path)
        if not any(Path(real).is_relative_to(r) for r in self.roots):
            self._refuse(path, f"{path!r} resolves to {real!r}, outside sources.allowed_roots")
            return None
        try:
            st = os.stat(real)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_dev, st.st_ino)
        known = self.files.get(key)
        if known is not None:
            known.path = path
            return key
        closed = self._closed.get(key)
        if closed is not None and closed[0] == st.st_size:
            return key  # closed and unchanged: nothing to read, no descriptor needed
        return key if self._open(path, real, key) else None

    def _open(self, path: str, real: str, key: tuple[int, int]) -> bool:
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            log.warning("tail %s: cannot open %s: %s", self.name, path, err)
            return False
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key or not stat.S_ISREG(st.st_mode):
            os.close(fd)  # swapped between stat and open
            return False
        offset, head = (self._stored or {}).get(key, 0), b""
        closed = self._closed.pop(key, None)
        if closed is not None and os.pread(fd, len(closed[1]), 0) == closed[1]:
            offset, head = closed  # read before in this process: go on where it ended
        if offset > st.st_size:
            offset, head = 0, b""
        fh = os.fdopen(fd, "rb", buffering=0)
        self.files[key] = _File(path, real, fh, key[0], key[1], offset, offset, head)
        log.info("tail %s: reading %s from offset %d", self.name, path, offset)
        return True

    def _refuse(self, path: str, message: str) -> None:
        if path in self._refused:
            return
        self._refused.add(path)
        log.warning("tail %s: skipped: %s", self.name, message)
        self.pipeline.stats.reject(self.name, [RecordError(-1, "path_not_allowed", message)])

    # -- reading -----------------------------------------------------------------------------
    def _read(self, f: _File) -> bool:
        size = os.fstat(f.fh.fileno()).st_size
        if size < f.offset or self._rewritten(f, size):
            log.warning("tail %s: %s was truncated; reading from 0", self.name, f.path)
            f.offset = f.committed = 0
            f.head = b""
            f.skipping = False
        if size == f.offset:
            return False
        data = os.pread(f.fh.fileno(), min(CHUNK_BYTES, size - f.offset), f.offset)
        if len(f.head) < HEAD_BYTES and f.offset == 0:
            f.head = data[:HEAD_BYTES]
        end = data.rfind(b"\n") + 1
        if end == 0:
            return self._no_newline(f, len(data))
        start = f.offset
        f.offset += end
        lines = data[:end].split(b"\n")[:-1]
        if f.skipping:
            lines, f.skipping = lines[1:], False
        self._submit(f, lines, start)
        return True

    def _rewritten(self, f: _File, size: int) -> bool:
        if not f.head or size < len(f.head):
            return False
        return os.pread(f.fh.fileno(), len(f.head), 0) != f.head

    def _no_newline(self, f: _File, n: int) -> bool:
        if n < MAX_LINE_BYTES:
            return False  # a partial last line: wait for its newline
        if not f.skipping:  # one warning and one rejection per over-long line, not per chunk
            message = f"{f.path}: a line over {MAX_LINE_BYTES} bytes at offset {f.offset}; skipped"
            log.warning("tail %s: %s", self.name, message)
            self.pipeline.stats.reject(self.name, [RecordError(-1, "too_large", message)])
        f.offset += n
        f.skipping = True
        return True

    def _submit(self, f: _File, lines: list[bytes], start: int) -> None:
        records, errors = split_lines(lines)
        if self.source.kind != "jsonl":
            records = self._map(records, errors)
        offset = OffsetUpdate(self.name, f.path, f.device, f.inode, f.offset)
        while True:
            try:
                future = self.pipeline.predictions_future(records, self.name, [offset], errors)
                break
            except QueueFullError as err:
                if self._stop.wait(min(err.retry_after, 1.0)):
                    f.offset = start  # not submitted: read again
                    return
            except ShuttingDownError:
                f.offset = start
                return
            except Exception as err:  # noqa: BLE001 - disk full, a bug: never skip these lines
                log.error(
                    "tail %s: %s not queued (%s); retrying from %d", self.name, f.path, err, start
                )
                f.offset = start
                self._stop.wait(min(getattr(err, "retry_after", 1.0), 5.0))
                return
        self.lines_read += len(lines)
        self._inflight.append((future, f, start, f.offset))
        while len(self._inflight) >= MAX_INFLIGHT:
            self._finish(*self._inflight.popleft())

    def _map(self, records: list[Any], errors: list[RecordError]) -> list[Any]:
        mapper = self._mapper or _load_mapper()
        kind, mapping = self.source.kind, dict(self.source.mapping)
        out = []
        for i, raw in enumerate(records):
            if is_malformed(raw):
                out.append(raw)
                continue
            try:
                out.append(self._usable_input(mapper(kind, mapping, raw, self.zone)))
            except ValidationError as err:
                errors.append(RecordError(i, err.reason, str(err)))
                out.append(PLACEHOLDER)
            except Exception as err:  # noqa: BLE001 - a line never escapes the boundary
                message = f"mapping failed: {type(err).__name__}: {str(err)[:120]}"
                errors.append(RecordError(i, "invalid_value", message))
                out.append(PLACEHOLDER)
        return out

    def _usable_input(self, event: Any) -> Any:
        """Drop (and count) an input URI serve cannot use; the prediction is kept."""
        value = event.get("input") if isinstance(event, dict) else None
        if value is None or (isinstance(value, dict) and "base64" in value):
            return event  # no input, or inline bytes (validated and stored by serve)
        uri = value.get("uri") if isinstance(value, dict) else value
        if uri is None:
            del event["input"]  # a null column: no input
            return event
        try:
            if not isinstance(uri, str):
                raise ValidationError("wrong_type", "the input URI must be a string")
            self.pipeline.parser.inputs.file_uri(uri)
        except ValidationError as err:
            del event["input"]
            self.pipeline.stats.drop_input(self.name, err.reason)
        return event

    def _collect(self) -> None:
        while self._inflight and self._inflight[0][0].done():
            self._finish(*self._inflight.popleft())

    def _finish(self, future: Future[BatchResult], f: _File, start: int, end: int) -> None:
        try:
            result = future.result()
        except Exception as err:  # the batch was not written: read it again (ids dedupe)
            log.error(
                "tail %s: write failed (%s); re-reading %s from %d", self.name, err, f.path, start
            )
            f.offset = min(f.offset, start)
            f.skipping = False
            return
        f.committed = max(f.committed, end)
        if result.rejected:
            first = result.rejected[0]
            log.warning(
                "tail %s: %s: %d lines rejected (first: %s %s)",
                self.name,
                f.path,
                len(result.rejected),
                first.reason,
                first.message,
            )

    def _drain_inflight(self) -> None:
        while self._inflight:
            self._finish(*self._inflight.popleft())

"""The SQLite store of ``patchd serve``: WAL mode, one writer connection, per-thread readers.

Usage::

    store = Store.open(config.store_path)
    with store.write() as conn:      # BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error)
        conn.execute("INSERT INTO kv ...")
    with store.read() as conn:       # a consistent snapshot on this thread's reader connection
        conn.execute("SELECT ...")
    store.close()

Serve is the only writer process (replicas sharing one file on one machine take turns through
SQLite's lock). Migrations (:data:`patchd.store.schema.MIGRATIONS`) are applied at open, one
transaction each, and tracked in ``PRAGMA user_version``; processes that open a new file at the
same moment take turns on an advisory file lock beside it (``<file>.migrate-lock``), so the later
ones find the work done.

Durability: ``synchronous=NORMAL`` in WAL mode means a committed transaction survives a crash or a
kill of the process; a power loss may lose the last transactions before the WAL checkpoint (the
SQLite trade-off every WAL user makes). Set ``store.synchronous: FULL`` for power-loss durability.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from patchd.exceptions import DiskFullError, StoreError
from patchd.store.readers import ThreadReaders
from patchd.store.schema import MIGRATIONS

log = logging.getLogger(__name__)

_PRAGMAS = (
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    "PRAGMA temp_store = MEMORY",
)
WRITER_CACHE_KIB = 16384  # one writer: a large page cache keeps index pages hot during ingest
READER_CACHE_KIB = 2048  # one reader per thread (threadpool): keep serve's RSS bounded


LOW_SPACE_BYTES = 1 << 20  # "disk I/O error" with less free than this is a full disk


def disk_error(path: Path, err: Exception) -> StoreError | DiskFullError:
    """The error to raise for a SQLite failure on ``path``: DiskFullError when the disk is full
    (SQLite says "database or disk is full", or "disk I/O error" with almost no space left)."""
    text = str(err)
    try:
        free: int | None = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    full = "disk is full" in text or ("disk I/O error" in text and (free or 0) < LOW_SPACE_BYTES)
    if full:
        left = f"{free} bytes free" if free is not None else "free space unknown"
        return DiskFullError(f"the store {path} cannot be written ({left} on its filesystem)")
    return StoreError(f"cannot open the store at {path}: {err}")


class SqliteConnection(sqlite3.Connection):
    """A ``sqlite3.Connection`` naming its dialect (:class:`patchd.store.backend.Connection`)."""

    dialect: Literal["sqlite"] = "sqlite"


def _connect(path: Path, synchronous: str, cache_kib: int) -> SqliteConnection:
    try:
        conn = sqlite3.connect(
            path,
            isolation_level=None,
            check_same_thread=False,
            timeout=10,
            factory=SqliteConnection,
        )
    except sqlite3.Error as err:
        raise StoreError(f"cannot open the store at {path}: {err}") from None
    for pragma in _PRAGMAS:
        conn.execute(pragma)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute(f"PRAGMA cache_size = -{cache_kib}")
    return conn


class Store:
    """A SQLite database in WAL mode with one writer and a reader connection per thread."""

    def __init__(self, path: Path, writer: SqliteConnection, synchronous: str) -> None:
        self.path = path
        self._writer = writer
        self._synchronous = synchronous
        self._write_lock = threading.RLock()
        self._readers = ThreadReaders(self._connect_reader)
        self._closed = False

    @classmethod
    def open(cls, path: Path, *, synchronous: str = "NORMAL") -> Store:
        """Open (creating if needed) and migrate the database at ``path``."""
        if synchronous not in ("NORMAL", "FULL"):
            raise StoreError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create the store directory {path.parent}: {err}") from None
        try:
            writer = _connect(path, synchronous, WRITER_CACHE_KIB)
            mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.Error as err:
            raise disk_error(path, err) from None
        if str(mode).lower() != "wal":
            writer.close()
            raise StoreError(
                f"the store {path} cannot use WAL mode (got {mode!r}); use a local disk"
            )
        store = cls(path, writer, synchronous)
        store.migrate()
        return store

    @property
    def location(self) -> str:
        return str(self.path)

    @property
    def schema_version(self) -> int:
        return int(self._writer.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> None:
        """Apply every migration above ``user_version``, one transaction each, holding the
        migration file lock (the version is read under it)."""
        with self._write_lock, _migration_lock(self.path):
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"the store {self.path} has schema version {current} but this patchd knows "
                    f"{len(MIGRATIONS)}; upgrade patchd or point store.path at another file"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                self._apply(version, MIGRATIONS[version - 1])

    def _apply(self, version: int, sql: str) -> None:
        script = f"BEGIN IMMEDIATE;\n{sql}\n;PRAGMA user_version = {version};\nCOMMIT;"
        try:
            self._writer.executescript(script)
        except sqlite3.Error as err:
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            found = disk_error(self.path, err)
            if isinstance(found, DiskFullError):
                raise found from None
            raise StoreError(f"migration {version} of {self.path} failed: {err}") from None
        log.info("store %s migrated to schema version %d", self.path, version)

    @contextmanager
    def write(self) -> Iterator[SqliteConnection]:
        """A write transaction on the single writer connection (serialised by a lock)."""
        self._check_open()
        with self._write_lock:
            conn = self._writer
            if conn.in_transaction:  # re-entrant use joins the outer transaction
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[SqliteConnection]:
        """A read transaction (one snapshot) on this thread's reader connection."""
        self._check_open()
        conn = self._readers.get()
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _connect_reader(self) -> SqliteConnection:
        conn = _connect(self.path, self._synchronous, READER_CACHE_KIB)
        conn.execute("PRAGMA query_only = ON")
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")

    def checkpoint(self) -> None:
        """Fold the WAL back into the database file (called on shutdown and by retention)."""
        with self._write_lock:
            self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        """Checkpoint and close every connection. Idempotent."""
        if self._closed:
            return
        with self._write_lock:
            try:
                self.checkpoint()
            except sqlite3.Error as err:
                log.warning("store %s: checkpoint on close failed: %s", self.path, err)
            self._closed = True
            self._readers.close_all(SqliteConnection.close)
            self._writer.close()
        log.info("store %s closed", self.path)


@contextmanager
def _migration_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<path>.migrate-lock`` (released when the block ends)."""
    lock_path = path.with_name(path.name + ".migrate-lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise StoreError(f"cannot create the migration lock {lock_path}: {err}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock

"""The backend-neutral store interface: what every module outside ``patchd.store.db`` /
``patchd.store.postgres`` may use, and :func:`open_store`, which picks the backend.

Backends:

- ``store.url`` unset: the embedded SQLite database at ``store.path`` (:mod:`patchd.store.db`);
- ``store.url: postgresql://user@host:5432/db``: PostgreSQL (:mod:`patchd.store.postgres`, psycopg
  3, imported only when configured, so serve without Postgres never loads it).

SQL dialect. Callers keep writing ``?`` / ``?N`` / ``:name`` placeholders (SQLite's styles) and SQL
both dialects accept: ``INSERT ... ON CONFLICT (...) DO NOTHING / DO UPDATE SET x = excluded.x``, an
alias on every derived table, ``"offset"`` quoted (reserved in Postgres). The Postgres adapter
rewrites placeholders to Postgres' native ``$N`` and runs them on a raw cursor (server-side
binding), so a literal ``%`` or ``?`` inside a quoted string is left alone and no caller changes its
parameters. This keeps one SQL text per statement (reviewable in one place, the SQLite hot path
untouched) instead of two copies of every query; the few statements where the backends differ for
speed (the batched prediction insert: multi-row VALUES on SQLite, COPY on Postgres) branch on
:attr:`Connection.dialect`.

Affected rows: use the cursor's ``rowcount`` (both drivers report the rows an INSERT / UPDATE /
DELETE changed, summed over ``executemany``); never ``sqlite3.Connection.total_changes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from patchd.config import Config

Dialect = Literal["sqlite", "postgres"]


class Cursor(Protocol):
    """The result of :meth:`Connection.execute` (a DB-API cursor)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection inside ``store.write()`` / ``store.read()`` (one transaction)."""

    @property
    def dialect(self) -> Dialect: ...

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor: ...


class Store(Protocol):
    """An open store: transactions, schema version, location (never holding a password)."""

    @property
    def location(self) -> str: ...

    @property
    def schema_version(self) -> int: ...

    def write(self) -> AbstractContextManager[Connection]: ...

    def read(self) -> AbstractContextManager[Connection]: ...

    def checkpoint(self) -> None: ...

    def close(self) -> None: ...


_PUT_KV = (
    "INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT (key) "
    "DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at"
)


def put_kv(conn: Connection, key: str, value: str, updated_at: float) -> None:
    """Inside a write transaction: set ``kv[key]`` (inserted or replaced; both dialects)."""
    conn.execute(_PUT_KV, (key, value, updated_at))


def open_store(config: Config) -> Store:
    """Open (and migrate) the store ``config.store`` names."""
    if config.store.url:
        from patchd.store.postgres import PostgresStore

        return PostgresStore.open(config.store.url, password_file=config.store.password_file)
    from patchd.store.db import Store as SqliteStore

    return SqliteStore.open(Path(config.store_path), synchronous=config.store.synchronous)

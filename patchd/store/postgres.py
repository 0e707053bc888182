"""The PostgreSQL store (``store.url: postgresql://...``): one writer, per-thread readers.

Same contract as :mod:`patchd.store.db` (see :mod:`patchd.store.backend`):

- ``store.write()``: a READ COMMITTED transaction on the one writer connection of this process
  (serialised by a lock; re-entrant use joins the outer transaction); COMMIT, or ROLLBACK on error.
  Several replicas may write at once: every insert is ``ON CONFLICT`` on its primary key.
- ``store.read()``: a REPEATABLE READ, READ ONLY transaction (one snapshot) on this thread's reader.
- Migrations (:data:`patchd.store.schema.PG_MIGRATIONS`, the same list as SQLite's) run at open,
  one transaction each, under ``pg_advisory_xact_lock``: two replicas starting at once migrate
  once. The version is the row of table ``patchd_schema``.

Statements use the callers' ``?`` / ``?N`` / ``:name`` placeholders, rewritten to ``$N`` by
:func:`to_native` (quoted strings and identifiers untouched) and bound server-side by a raw cursor.

Passwords: from the URL, libpq's environment (``PGPASSWORD``, ``~/.pgpass``) or
``store.password_file``; every message and :attr:`PostgresStore.location` shows the URL redacted.
psycopg is imported here only, so serve without Postgres never loads it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from patchd.exceptions import StoreError
from patchd.store.readers import ThreadReaders
from patchd.store.schema import PG_MIGRATIONS

try:
    import psycopg
    from psycopg import sql as pgsql
except ImportError as err:  # pragma: no cover - depends on the install
    raise StoreError(
        f"store.url names PostgreSQL but psycopg is not installed ({err}); "
        "install the extra: pip install 'patchd[postgres]'"
    ) from None

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x70617463  # "patc": the advisory lock key of schema migrations
CONNECT_TIMEOUT_S = 10
STAGE_TABLE = "predictions_stage"


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs, errors and status)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class NativeSql(NamedTuple):
    """A statement in Postgres' ``$N`` style; ``names``: the ``:name`` of each ``$N`` in order
    (empty for positional statements)."""

    sql: str
    names: tuple[str, ...]

    def bind(self, parameters: Any) -> Any:
        """Positional parameters for :attr:`sql` (a mapping is ordered by :attr:`names`)."""
        if isinstance(parameters, Mapping):
            return [parameters[name] for name in self.names]
        return parameters or None


@lru_cache(maxsize=1024)
def to_native(sql: str) -> NativeSql:
    """``sql`` with ``?`` / ``?N`` / ``:name`` placeholders as ``$N`` (not inside quotes, not a
    ``::`` cast); a name used twice is one parameter."""
    out: list[str] = []
    names: list[str] = []
    i, n, quote = 0, 0, ""
    while i < len(sql):
        ch = sql[i]
        if quote:
            out.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            out.append(ch)
        elif ch == "?":
            j = i + 1
            while j < len(sql) and sql[j].isdigit():
                j += 1
            if j > i + 1:
                out.append(f"${sql[i + 1 : j]}")
            else:
                n += 1
                out.append(f"${n}")
            i = j
            continue
        elif ch == ":" and sql[i + 1 : i + 2] == ":":
            out.append("::")  # a cast
            i += 2
            continue
        elif ch == ":" and (sql[i + 1 : i + 2].isalpha() or sql[i + 1 : i + 2] == "_"):
            j = i + 1
            while j < len(sql) and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            name = sql[i + 1 : j]
            if name not in names:
                names.append(name)
            out.append(f"${names.index(name) + 1}")
            i = j
            continue
        else:
            out.append(ch)
        i += 1
    return NativeSql("".join(out), tuple(names))


class PgConnection:
    """A psycopg connection speaking the store's :class:`~patchd.store.backend.Connection`."""

    dialect: Literal["postgres"] = "postgres"

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw
        self.expect_duplicates = False  # the last prediction batch repeated stored ids

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        native = to_native(sql)
        return self.raw.cursor().execute(native.sql, native.bind(parameters))

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Any:
        native = to_native(sql)
        cur = self.raw.cursor()
        cur.executemany(native.sql, [native.bind(p) for p in parameters])
        return cur


class PostgresStore:
    """A PostgreSQL database with one writer and a reader connection per thread."""

    def __init__(self, url: str, password: str | None) -> None:
        self.url = url
        self._password = password
        self._write_lock = threading.RLock()
        self._depth = 0
        self._local = threading.local()  # this thread's read nesting depth
        self._readers = ThreadReaders(self._connect)
        self._closed = False
        self._writer = self._connect()
        self._prepare_writer()

    @classmethod
    def open(cls, url: str, *, password_file: Path | None = None) -> PostgresStore:
        """Connect to and migrate the database at ``url``."""
        password = None
        if password_file is not None:
            try:
                password = Path(password_file).read_text().splitlines()[0].strip()
            except (OSError, IndexError) as err:
                raise StoreError(
                    f"store.password_file {password_file} cannot be read: {err}"
                ) from None
        store = cls(url, password)
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def location(self) -> str:
        return redact_url(self.url)

    def _connect(self) -> PgConnection:
        kwargs: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S}
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            raw = psycopg.connect(
                self.url, autocommit=True, cursor_factory=psycopg.RawCursor, **kwargs
            )
        except psycopg.Error as err:
            reason = str(err).replace(self._password or "\0", "***").strip()
            raise StoreError(
                f"cannot connect to the store at {self.location}: {reason}; check store.url "
                "(host, port, database, user) and that the server is running"
            ) from None
        return PgConnection(raw)

    def _prepare_writer(self) -> None:
        """The session's COPY staging table (temporary: private to this connection)."""
        self._writer.raw.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {STAGE_TABLE} "
            "(LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            if self._has_table("predictions")
            else "SELECT 1"
        )

    def _has_table(self, name: str) -> bool:
        row = self._writer.raw.execute("SELECT to_regclass($1)", (name,)).fetchone()
        return row is not None and row[0] is not None

    @property
    def schema_version(self) -> int:
        if not self._has_table("patchd_schema"):
            return 0
        row = self._writer.raw.execute("SELECT version FROM patchd_schema").fetchone()
        return int(row[0]) if row else 0

    def migrate(self) -> None:
        """Apply every migration above the stored version, one transaction each, under an
        advisory lock (a replica that waited finds the work done)."""
        with self._write_lock:
            raw = self._writer.raw
            for version in range(1, len(PG_MIGRATIONS) + 1):
                try:
                    with raw.transaction():
                        raw.execute("SELECT pg_advisory_xact_lock($1)", (MIGRATION_LOCK,))
                        raw.execute(
                            "CREATE TABLE IF NOT EXISTS patchd_schema (version INTEGER NOT NULL)"
                        )
                        row = raw.execute("SELECT version FROM patchd_schema").fetchone()
                        current = int(row[0]) if row else 0
                        if current > len(PG_MIGRATIONS):
                            raise StoreError(
                                f"the store {self.location} has schema version {current} but "
                                f"this patchd knows {len(PG_MIGRATIONS)}; upgrade patchd or "
                                "point store.url at another database"
                            )
                        if current >= version:
                            continue
                        raw.execute(PG_MIGRATIONS[version - 1])
                        raw.execute("DELETE FROM patchd_schema")
                        raw.execute("INSERT INTO patchd_schema VALUES ($1)", (version,))
                except psycopg.Error as err:
                    raise StoreError(
                        f"migration {version} of {self.location} failed: {err}"
                    ) from None
                log.info("store %s migrated to schema version %d", self.location, version)
            self._prepare_writer()

    @contextmanager
    def write(self) -> Iterator[PgConnection]:
        """A write transaction on the single writer connection (serialised by a lock)."""
        self._check_open()
        with self._write_lock:
            conn = self._writer
            if self._depth:
                yield conn
                return
            self._depth += 1
            try:
                with _mapped(self.location), conn.raw.transaction():
                    yield conn
            finally:
                self._depth -= 1

    @contextmanager
    def read(self) -> Iterator[PgConnection]:
        """A read-only transaction (one snapshot) on this thread's reader connection."""
        self._check_open()
        conn = self._readers.get()
        if getattr(self._local, "depth", 0):
            yield conn
            return
        self._local.depth = 1
        try:
            with _mapped(self.location), conn.raw.transaction():
                conn.raw.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield conn
        finally:
            self._local.depth = 0

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self.location} is closed")

    def checkpoint(self) -> None:
        """Refresh the planner's statistics (Postgres checkpoints on its own)."""
        with self._write_lock:
            self._writer.raw.execute("ANALYZE predictions")

    def close(self) -> None:
        """Close every connection. Idempotent."""
        if self._closed:
            return
        with self._write_lock:
            self._closed = True
            self._readers.close_all(lambda conn: conn.raw.close())
            self._writer.raw.close()
        log.info("store %s closed", self.location)


@contextmanager
def _mapped(location: str) -> Iterator[None]:
    """psycopg's connection failures as StoreError (SQL errors stay psycopg's, as sqlite3's do)."""
    try:
        yield
    except psycopg.OperationalError as err:
        raise StoreError(f"the store {location} failed: {err}") from err


# the predictions columns' Postgres types, for binary COPY (schema.PG_MIGRATIONS)
_COLUMN_TYPES = {
    "model": "text", "id": "text", "ts": "float8", "model_version": "text", "pred": "int8",
    "confidence": "float8", "probs": "bytea", "group_key": "text", "groups": "text",
    "input_uri": "text", "embedding": "bytea", "source": "text", "ingested_at": "float8",
    "label": "int8", "labeled_at": "float8",
}  # fmt: skip


def copy_predictions(
    conn: PgConnection, rows: Iterable[Sequence[Any]], columns: Sequence[str]
) -> int:
    """Insert ``rows`` (ignoring ids already stored); the number inserted.

    Fast path: binary COPY straight into ``predictions`` inside a savepoint, twice the rate of
    staging on the bench (no second write of every row). A batch that repeats a stored id fails
    that COPY with a unique violation; it is rolled back to the savepoint and the batch goes
    through the staging table (COPY, then ``INSERT ... SELECT ... ON CONFLICT DO NOTHING``). After
    a batch with duplicates the next one is staged directly (replays repeat ids batch after
    batch), until a staged batch finds none.
    """
    batch = rows if isinstance(rows, list) else list(rows)
    if not conn.expect_duplicates:
        try:
            with conn.raw.transaction():
                _copy(conn, "predictions", batch, columns)
            return len(batch)
        except psycopg.errors.UniqueViolation:
            conn.expect_duplicates = True
    inserted = _stage_and_insert(conn, batch, columns)
    conn.expect_duplicates = inserted < len(batch)
    return inserted


def _copy(
    conn: PgConnection, table: str, rows: list[Sequence[Any]], columns: Sequence[str]
) -> None:
    names = pgsql.SQL(", ").join(map(pgsql.Identifier, columns))
    statement = pgsql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)")
    with conn.raw.cursor() as cur, cur.copy(
        statement.format(pgsql.Identifier(table), names)
    ) as copy:  # fmt: skip
        copy.set_types([_COLUMN_TYPES[c] for c in columns])
        for row in rows:
            copy.write_row(row)


def _stage_and_insert(conn: PgConnection, rows: list[Sequence[Any]], columns: Sequence[str]) -> int:
    names = pgsql.SQL(", ").join(map(pgsql.Identifier, columns))
    stage = pgsql.Identifier(STAGE_TABLE)
    _copy(conn, STAGE_TABLE, rows, columns)
    with conn.raw.cursor() as cur:
        cur.execute(
            pgsql.SQL(
                "INSERT INTO predictions ({}) SELECT {} FROM {} ON CONFLICT (model, id) DO NOTHING"
            ).format(names, names, stage)
        )
        inserted = cur.rowcount
        cur.execute(pgsql.SQL("TRUNCATE {}").format(stage))  # one transaction may stage twice
    return inserted

"""A private, throwaway PostgreSQL server (initdb + pg_ctl in a directory) for tests and benches.

``with PrivatePostgres(workdir) as pg: pg.url`` gives ``postgresql://patchd@127.0.0.1:<port>/patchd``
on a free loopback port, its unix socket inside ``workdir``, trust authentication, ``fsync=off``
(speed: the data is thrown away; ``durable=True`` keeps Postgres' defaults, for benches).
:meth:`PrivatePostgres.create_database` adds more databases.
Run as root (initdb refuses root), the server runs as the ``postgres`` (else ``nobody``) user in
a fresh directory under the system temp dir owned by that user, removed on stop.
Never for production (see docs/operating.md, "Production Postgres").
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from patchd.exceptions import StoreError

START_TIMEOUT_S = 30.0
DEBIAN_DIRS = Path("/usr/lib/postgresql")  # Debian's versioned bin dirs: <version>/bin


def find_binary(name: str) -> str:
    """The path of Postgres' ``name`` (initdb, pg_ctl), on PATH or in Debian's versioned dir."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(DEBIAN_DIRS.glob("*/bin"), key=lambda p: _version(p.parent.name))
    for folder in reversed(versions):  # the newest installed first
        candidate = folder / name
        if candidate.exists():
            return str(candidate)
    raise StoreError(
        f"{name} is not installed: run scripts/setup.sh (apt-get install postgresql) "
        "or pass --store-url for an existing server"
    )


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def _unprivileged_user() -> str:
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise StoreError("running as root and no postgres/nobody user exists to run the server as")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A Postgres server process owned by this object (stopped, data kept, on exit)."""

    def __init__(
        self,
        workdir: Path,
        *,
        user: str = "patchd",
        database: str = "patchd",
        durable: bool = False,
    ) -> None:
        """``durable``: Postgres' production defaults (fsync, synchronous commit) for benches;
        off (the default, for tests), commits skip the disk flush."""
        self._as: str | None = None
        self.durable = durable
        if os.geteuid() == 0:
            self._as = _unprivileged_user()
            workdir = Path(tempfile.mkdtemp(prefix="patchd-pg-"))
            entry = pwd.getpwnam(self._as)
            os.chown(workdir, entry.pw_uid, entry.pw_gid)
        self.workdir = Path(workdir)
        self.data = self.workdir / "data"
        self.user = user
        self.database = database
        self.port = 0
        self._pg_ctl = find_binary("pg_ctl")
        self._initdb = find_binary("initdb")

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PrivatePostgres:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [self._initdb, "-D", str(self.data), "-U", self.user, "-A", "trust", "-E", "UTF8"]
            )
        self.port = _free_port()
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1"
        options += " -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        log = self.workdir / "postgres.log"
        self._run(
            [self._pg_ctl, "-D", str(self.data), "-l", str(log), "-o", options, "-w", "start"]
        )
        self.create_database(self.database)
        return self

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if absent); its URL."""
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if row is None:
                conn.execute(f'CREATE DATABASE "{name}"')  # name: chosen by tests and benches
        return self.url_for(name)

    def stop(self) -> None:
        if self.port:
            subprocess.run(
                [self._pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop"],
                capture_output=True,
                timeout=START_TIMEOUT_S,
                check=False,
            )
            self.port = 0
        if self._as is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _run(self, argv: list[str]) -> None:
        started = time.monotonic()
        if self._as is not None:
            argv = ["runuser", "-u", self._as, "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        if done.returncode != 0:
            raise StoreError(
                f"{Path(argv[0]).name} failed after {time.monotonic() - started:.1f}s: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

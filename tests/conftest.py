"""Shared fixtures: a private redis-server, free ports, and a real `patchd serve` process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import ServeProcess, start_serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free loopback port for the whole test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not installed: run `make setup` (apt-get install redis-server)"
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def clean_redis(redis_url: str) -> Iterator[str]:
    """The private redis, flushed before and after the test."""
    import redis

    conn = redis.Redis.from_url(redis_url)
    conn.flushall()
    yield redis_url
    conn.flushall()


@pytest.fixture
def serve(tmp_path: Path, clean_redis: str) -> Iterator[ServeProcess]:
    """A real `patchd serve` with a minimal config; use `start_serve` directly to customise."""
    proc = start_serve(tmp_path, {"redis": {"url": clean_redis, "embedded": "never"}})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A private PostgreSQL server (initdb + pg_ctl, free port, fsync=off)."""
    from patchd.exceptions import StoreError
    from patchd.store.pg_local import PrivatePostgres

    try:
        server = PrivatePostgres(tmp_path_factory.mktemp("postgres")).start()
    except StoreError as err:
        pytest.fail(f"cannot start a private Postgres: {err} (run scripts/setup.sh)")
    yield server
    server.stop()


_DATABASES = iter(range(1, 1 << 30))


@pytest.fixture
def postgres_url(postgres_server: object) -> str:
    """The URL of a fresh, empty database on the private Postgres (one per test)."""
    from patchd.store.pg_local import PrivatePostgres

    assert isinstance(postgres_server, PrivatePostgres)
    return postgres_server.create_database(f"t{os.getpid()}_{next(_DATABASES)}")


@pytest.fixture(params=["sqlite", "postgres"])
def backend_store_config(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """``store:`` config of each backend in turn: SQLite under tmp_path, or a fresh Postgres db."""
    if request.param == "sqlite":
        return {"path": str(tmp_path / "db" / "patchd.db")}
    return {"url": request.getfixturevalue("postgres_url")}


@pytest.fixture
def any_store(backend_store_config: dict[str, object], tmp_path: Path) -> Iterator[object]:
    """An open store of each backend in turn (the store suite runs against both)."""
    from patchd.config import build_config
    from patchd.store.backend import open_store

    cfg = build_config({"state_dir": str(tmp_path), "store": backend_store_config})
    store = open_store(cfg)
    yield store
    store.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-API server process (moto's standalone server) on a free loopback port."""
    import sys

    import httpx

    if subprocess.run([sys.executable, "-c", "import moto.server"], capture_output=True).returncode:
        pytest.fail("moto[server] is not installed: run `make setup` (pip install -e '.[dev]')")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "1"},
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=0.5)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


_BUCKETS = iter(range(1, 1 << 30))


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A fresh bucket on the private S3 server: ``{"url", "storage_options"}`` for the config.

    The credentials go through the environment variables the storage options name, as in
    production (moto accepts any key)."""
    import s3fs

    monkeypatch.setenv("S3_TEST_KEY_ID", "testing")
    monkeypatch.setenv("S3_TEST_SECRET", "testing")
    bucket = f"patchd-{os.getpid()}-{next(_BUCKETS)}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing")
    fs.call_s3("create_bucket", Bucket=bucket)
    options = {
        "endpoint_url": s3_server,
        "region": "us-east-1",
        "key_env": "S3_TEST_KEY_ID",
        "secret_env": "S3_TEST_SECRET",
    }
    return {"url": f"s3://{bucket}", "storage_options": options}

"""Embedded redis-server: started when nothing answers (auto), stopped on exit, clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from patchd.config import build_config
from patchd.exceptions import DependencyMissingError
from patchd.runs.redis_embedded import answers, ensure_redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_auto_starts_a_private_redis_with_aof_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    config = build_config(
        {"state_dir": str(tmp_path), "redis": {"url": f"redis://127.0.0.1:{port}/0"}}
    )
    server, url = ensure_redis(config)
    try:
        assert server is not None and url.endswith(f":{port}/0")
        assert answers("127.0.0.1", port)
        import redis

        conn = redis.Redis(port=port)
        assert conn.config_get("appendonly")["appendonly"] == "yes"
        assert conn.config_get("appendfsync")["appendfsync"] == "everysec"
        assert conn.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        again, _ = ensure_redis(config)  # something answers now: auto uses it
        assert again is None
    finally:
        assert server is not None
        server.stop()
    assert not answers("127.0.0.1", port)
    assert (tmp_path / "redis").is_dir()


def test_never_does_not_start_one(tmp_path: Path) -> None:
    port = free_port()
    config = build_config(
        {
            "state_dir": str(tmp_path),
            "redis": {"url": f"redis://127.0.0.1:{port}/0", "embedded": "never"},
        }
    )
    assert ensure_redis(config)[0] is None


def test_missing_binary_gives_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("patchd.runs.redis_embedded.shutil.which", lambda name: None)
    config = build_config(
        {"state_dir": str(tmp_path), "redis": {"url": f"redis://127.0.0.1:{free_port()}/0"}}
    )
    with pytest.raises(DependencyMissingError, match="apt-get install redis-server"):
        ensure_redis(config)

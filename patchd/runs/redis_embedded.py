"""A private ``redis-server`` for serve when nothing answers at ``redis.url``.

``redis.embedded``:

- ``never``: use ``redis.url`` as is (a warning when nothing answers: runs cannot be queued);
- ``auto`` (default): if nothing answers at a loopback ``redis.url``, start ``redis-server`` on
  that port under ``<state_dir>/redis/`` (AOF ``everysec``, ``noeviction``, bound to 127.0.0.1)
  and stop it when serve exits;
- ``always``: always start the private server (fails if the port is taken).

Workers on the same machine use the same ``redis.url`` and so find it. A missing binary is a
:class:`~patchd.exceptions.DependencyMissingError` with the install hint.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from patchd.config import Config
from patchd.exceptions import ConfigError, DependencyMissingError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "install it (Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: `brew install redis`) "
    "or point redis.url at a running Redis and set redis.embedded: never"
)
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when a Redis answers PING at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH", b"-ERR"))
    except OSError:
        return False


@dataclass
class EmbeddedRedis:
    process: subprocess.Popen[bytes]
    port: int
    workdir: Path

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN via SIGTERM (redis flushes the AOF), SIGKILL if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log.info("embedded redis-server on port %d stopped", self.port)


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"redis.url: unsupported scheme in {url!r}; use redis://host:port/db")
    return parts.hostname or "127.0.0.1", parts.port or 6379


def ensure_redis(config: Config) -> tuple[EmbeddedRedis | None, str]:
    """Start the private redis-server when the config asks for it; returns (server, url)."""
    url = config.redis.url
    mode = config.redis.embedded
    if urlsplit(url).scheme == "unix":
        return None, url
    host, port = _host_port(url)
    if mode == "never":
        if not answers(host, port):
            log.warning(
                "no Redis answers at %s (redis.embedded: never): runs cannot be queued", url
            )
        return None, url
    if mode == "auto" and answers(host, port):
        return None, url
    if host not in _LOOPBACK:
        log.warning(
            "no Redis answers at %s and it is not a loopback address: not starting one", url
        )
        return None, url
    return start_redis(config.state_dir / "redis", port), url


def start_redis(workdir: Path, port: int, wait_s: float = 10.0) -> EmbeddedRedis:
    binary = shutil.which("redis-server")
    if binary is None:
        raise DependencyMissingError(f"redis-server is not installed: {INSTALL_HINT}")
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--maxmemory-policy",
        "noeviction",
        "--save",
        "",
        "--daemonize",
        "no",
        "--logfile",
        str(workdir / "redis.log"),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DependencyMissingError(
                f"redis-server exited with {process.returncode} on port {port}; "
                f"see {workdir / 'redis.log'} (port in use?)"
            )
        if answers("127.0.0.1", port, timeout=0.2):
            log.info("started embedded redis-server on 127.0.0.1:%d under %s", port, workdir)
            return EmbeddedRedis(process, port, workdir)
        time.sleep(0.05)
    process.kill()
    raise DependencyMissingError(f"redis-server did not answer on port {port} within {wait_s}s")

"""Real processes for integration tests: `patchd serve` and `patchd worker`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

PATCHD = str(Path(sys.executable).with_name("patchd"))
TOKEN = "test-admin-token-0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    url: str
    config_path: Path
    state_dir: Path
    log_path: Path
    token: str = TOKEN
    env: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = None) -> httpx.Client:
        auth = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {auth}"} if auth else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def write_config(tmp_path: Path, overrides: dict[str, Any], port: int | None = None) -> Path:
    base = {
        "state_dir": str(tmp_path / "state"),
        "api": {"port": port or _free_port()},
        "redis": {"embedded": "never"},
    }
    path = tmp_path / "patchd.yaml"
    path.write_text(yaml.safe_dump(_deep_merge(base, overrides)))
    return path


def start_serve(
    tmp_path: Path,
    overrides: dict[str, Any],
    *,
    config_path: Path | None = None,
    wait_s: float = 60,
    extra_env: dict[str, str] | None = None,
) -> ServeProcess:
    """Start `patchd serve -c <config>` and wait until /readyz answers 200."""
    path = config_path or write_config(tmp_path, overrides)
    cfg = yaml.safe_load(path.read_text())
    url = f"http://127.0.0.1:{cfg['api']['port']}"
    env = {**os.environ, "PATCHD_TOKEN": TOKEN, **(extra_env or {})}
    log_path = tmp_path / f"serve-{time.time_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([PATCHD, "serve", "-c", str(path)], stdout=log, stderr=log, env=env)
    served = ServeProcess(proc, url, path, Path(cfg["state_dir"]), log_path, env=env)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"patchd serve exited {proc.returncode}:\n{served.log()}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    served.stop(signal.SIGKILL)
    raise RuntimeError(f"patchd serve not ready after {wait_s}s:\n{served.log()}")


def start_worker(config_path: Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start `patchd worker -c <config>` (a forking RQ worker) in the background."""
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [PATCHD, "worker", "-c", str(config_path), *extra], stdout=log, stderr=log, env=env
        )

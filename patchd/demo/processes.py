"""Child processes the demo starts (serve, worker, model server) and stops on exit."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from patchd.exceptions import PatchdError

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Children:
    """Starts processes with logs under ``log_dir``; ``stop_all`` ends them in reverse order."""

    log_dir: Path
    env: dict[str, str]
    started: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=out, env=self.env, start_new_session=True
            )
        child = Child(name, proc, log_path)
        self.started.append(child)
        return child

    def check(self) -> None:
        for child in self.started:
            if child.proc.poll() is not None:
                raise PatchdError(
                    f"{child.name} exited with {child.proc.returncode}; its log "
                    f"({child.log_path}) ends with:\n{child.tail()}"
                )

    def stop_all(self, timeout: float = 20.0) -> None:
        for child in reversed(self.started):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.started):
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
        self.started.clear()


def patchd_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "patchd", *args]


def wait_http(
    url: str, ready: Callable[[httpx.Response], bool], children: Children, timeout: float = 60.0
) -> None:
    """Poll ``url`` until ``ready(response)``; fail early when a child died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children.check()
        try:
            if ready(httpx.get(url, timeout=2)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise PatchdError(f"{url} did not become ready within {timeout:.0f}s")

"""Hot reload: watch a registry's ``production.json`` and swap the served model when it changes.

The pointer is replaced atomically by patchd (``os.replace``), so reading it yields the old or
the new content. The watcher polls the file's identity (inode, size, mtime) every ``interval``
seconds and re-reads its content at least every ``full_check_every`` polls (mtime granularity
can hide two switches within one tick); on a change it calls
:meth:`~patchd.plugins.serving.loader.ProductionModel.reload_if_changed`, which verifies the
sha256 before the swap and keeps the old model on any error. A reload also happens on demand:
``POST`` the hook URL of your server and call ``reload_if_changed()`` there.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class Reloadable(Protocol):
    """What the watcher needs of a served model (``ProductionModel`` is one)."""

    registry_root: Path
    model_name: str

    @property
    def digest(self) -> str | None: ...  # read-only: the watcher only reads it

    def reload_if_changed(self) -> bool: ...


class PointerWatcher:
    """A daemon thread polling one model's ``production.json``."""

    def __init__(
        self, model: Reloadable, interval: float = 1.0, full_check_every: int = 10
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.model = model
        self.interval = interval
        self.full_check_every = max(1, full_check_every)
        self.path = model.registry_root / model.model_name / "production.json"
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"patchd-watch-{model.model_name}", daemon=True
        )
        self._seen: tuple[int, int, int] | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _identity(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def poll(self, force: bool = False) -> bool:
        """One check; True when a new model was swapped in."""
        identity = self._identity()
        if identity is None or (identity == self._seen and not force):
            return False
        swapped = self.model.reload_if_changed()
        if self.model.digest is not None:
            self._seen = identity  # a failed load is retried on the next full check
        return swapped

    def _run(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval):
            ticks += 1
            try:
                self.poll(force=ticks % self.full_check_every == 0)
            except Exception:  # never let the watcher die
                log.exception("watching %s failed; retrying", self.path)

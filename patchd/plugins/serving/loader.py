"""Load the production model from a patchd registry inside a model server.

    from patchd.plugins.serving.loader import ProductionModel

    prod = ProductionModel("/srv/patchd/registry", "skin", "mypkg.models:build", {"classes": 2})
    prod.load()                      # verified load of production.json's version
    prod.start_watching(interval=2)  # hot-reload when the pointer changes
    logits = prod.module(x)          # or: with prod.lock: ... for a consistent (module, digest)

The architecture comes from code (a callable, or ``module:callable`` + kwargs); the weights are
safetensors only. The file is read into memory once, its sha256 compared with the digest the
pointer names, and only those verified bytes are deserialized, so a partially written, replaced or
tampered file is never loaded. Any error keeps the current model serving.
Importing this module does not import torch (it is imported when a model is loaded).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.exceptions import IntegrityError, NotFoundError, PluginError

if TYPE_CHECKING:
    from patchd.plugins.serving.reload import PointerWatcher

log = logging.getLogger(__name__)

BuildFn = Callable[[], Any]


@dataclass(frozen=True)
class Loaded:
    module: Any  # torch.nn.Module in eval mode
    digest: str
    promoted_at: float  # wall clock of the pointer switch (from production.json)
    loaded_at: float  # wall clock of the swap in this process


def resolve_build_fn(build: BuildFn | str, kwargs: dict[str, Any] | None = None) -> BuildFn:
    """A zero-argument callable building the architecture, from a callable or ``module:attr``."""
    if callable(build):
        return build if not kwargs else (lambda: build(**kwargs))
    module_name, _, attr = str(build).partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise PluginError(f"model factory {build!r} cannot be imported: {err}") from err
    return lambda: factory(**(kwargs or {}))


def read_pointer(registry_root: Path, model_name: str) -> dict[str, Any]:
    path = Path(registry_root) / model_name / "production.json"
    try:
        return dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        raise NotFoundError("production model", model_name) from None


def load_verified(weights: Path, digest: str, build_fn: BuildFn, device: str = "cpu") -> Any:
    """Build the architecture and load ``weights`` after checking their sha256 is ``digest``."""
    import torch
    from safetensors.torch import load as load_safetensors

    data = weights.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise IntegrityError(
            f"{weights} has sha256 {actual[:12]}, the pointer names {digest[:12]}: not loading it"
        )
    state = load_safetensors(data)
    module = build_fn()
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise IntegrityError(
            f"{weights} does not fit the architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; check the model factory"
        )
    return module.to(torch.device(device)).eval()


class ProductionModel:
    """The current production model of one registry model, swapped atomically on reload."""

    def __init__(
        self,
        registry_root: Path | str,
        model_name: str,
        build_fn: BuildFn | str,
        factory_kwargs: dict[str, Any] | None = None,
        device: str = "cpu",
    ) -> None:
        self.registry_root = Path(registry_root)
        self.model_name = model_name
        self.build_fn = resolve_build_fn(build_fn, factory_kwargs)
        self.device = device
        self.lock = threading.RLock()
        self._current: Loaded | None = None
        self._watcher: PointerWatcher | None = None
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None
        self.on_swap: list[Callable[[Loaded], None]] = []

    @property
    def current(self) -> Loaded:
        loaded = self._current
        if loaded is None:
            raise NotFoundError("loaded production model", self.model_name)
        return loaded

    @property
    def module(self) -> Any:
        return self.current.module

    @property
    def digest(self) -> str | None:
        return self._current.digest if self._current else None

    def load(self) -> Loaded:
        """Load whatever production.json names now (raises on any error)."""
        pointer = read_pointer(self.registry_root, self.model_name)
        digest = str(pointer["sha256"])
        if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise IntegrityError(f"production.json names {digest!r}, not a sha256 digest")
        weights = self.registry_root / self.model_name / "versions" / digest / "model.safetensors"
        module = load_verified(weights, digest, self.build_fn, self.device)
        loaded = Loaded(module, digest, float(pointer.get("promoted_at", 0.0)), time.time())
        with self.lock:
            self._current = loaded
            self.reloads += 1
        log.info("loaded %s@%s from %s", self.model_name, digest[:12], self.registry_root)
        for callback in list(self.on_swap):
            callback(loaded)
        return loaded

    def reload_if_changed(self) -> bool:
        """Load the pointer's model if it differs from the current one; False (and the old model
        keeps serving) when nothing changed or anything fails."""
        try:
            pointer = read_pointer(self.registry_root, self.model_name)
            if pointer.get("sha256") == self.digest:
                return False
            self.load()
            return True
        except Exception as err:  # keep serving the old model on ANY error
            self.failures += 1
            self.last_error = f"{type(err).__name__}: {err}"
            log.error(
                "reload of %s failed, still serving %s: %s",
                self.model_name,
                (self.digest or "nothing")[:12],
                self.last_error,
            )
            return False

    def start_watching(self, interval: float = 1.0) -> PointerWatcher:
        """Poll production.json every ``interval`` seconds on a daemon thread."""
        from patchd.plugins.serving.reload import PointerWatcher

        if self._watcher is None:
            self._watcher = PointerWatcher(self, interval)
            self._watcher.start()
        return self._watcher

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

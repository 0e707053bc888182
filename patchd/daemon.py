"""``patchd serve``: builds the services and components, serves the API, shuts down cleanly.

Lifecycle (:class:`RunState`): ``created → starting → running → stopping → stopped``.

Start: Redis (embedded when configured and nothing answers), the store, the ingest pipeline,
:class:`~patchd.services.Services`, every component of :data:`COMPONENTS`
(collectors and routers registered, then ``start()``), the scheduler, tail sources, then uvicorn.
A listed component that cannot be imported or built stops startup with an error naming it.

Signals: the first SIGTERM/SIGINT is a warm shutdown (stop intake, let in-flight requests finish,
flush the queue, stop components, close the store); a second one is cold (stop without waiting
for queued writes; nothing unacknowledged was promised, and SQLite stays consistent).

Reload (SIGHUP, or ``POST /v1/config/reload`` with an ``admin`` token): the configuration file
is read and validated again; the fields in :data:`RELOADABLE` (the monitor's thresholds, the
gate) take effect at once (every monitor cell is re-judged over its window), other changed
fields are logged and reported as needing a restart. An invalid file changes nothing.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import gc
import importlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from patchd.api.admin import admin_router
from patchd.api.app import create_app
from patchd.api.auth import TokenStore
from patchd.api.metrics import (
    BuildInfoCollector,
    ModelLabelCollector,
    metrics_router,
    patchd_version,
)
from patchd.api.models import ModelDispatch, model_scoped_routes, models_router, scoped_router
from patchd.api.status import status_router
from patchd.config import Config
from patchd.domain import EventBus
from patchd.exceptions import ConfigError, DiskFullError, NotFoundError, PatchdError, PluginError
from patchd.ingest.api import ingest_router
from patchd.ingest.metrics import IngestCollector
from patchd.ingest.pipeline import IngestPipeline
from patchd.leader import Leadership
from patchd.services import Component, Services, job_errors_counter
from patchd.store.backend import open_store
from patchd.store.predictions import count_pending, count_predictions

log = logging.getLogger(__name__)


class RunState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_ALLOWED = {
    RunState.CREATED: {RunState.STARTING, RunState.STOPPED},
    RunState.STARTING: {RunState.RUNNING, RunState.STOPPING},
    RunState.RUNNING: {RunState.STOPPING},
    RunState.STOPPING: {RunState.STOPPED},
    RunState.STOPPED: set(),
}


# The parts serve is composed of, in start order (``module:Class`` of a Component).
COMPONENTS: list[str] = [
    "patchd.monitor.component:MonitorComponent",
    "patchd.runs.component:RunsComponent",
    "patchd.promotion.component:CandidatesComponent",
    "patchd.notify.component:NotifyComponent",
    "patchd.ui.component:UiComponent",
    "patchd.plugins.sources.kserve:KServeComponent",
    "patchd.plugins.sources.seldon:SeldonComponent",
]

GC_THRESHOLDS = (100_000, 20, 50)


def tune_gc() -> None:
    """Freeze what startup allocated and collect the young generation less often.

    Ingest allocates a few containers per event (parsed dicts, lists, row tuples) that refcounting
    frees; with the default thresholds the cyclic collector ran every 700 allocations and its full
    passes walked every module object of serve: ~4 us of CPU per ingested event. Frozen objects
    are never scanned again. The young generation is collected once the tracked objects grew by
    100k (a steady ingest frees what it allocates, so it rarely is); garbage cycles still are.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


GIL_SWITCH_INTERVAL_S = 0.0005


def tune_gil() -> None:
    """Hand the GIL over every 0.5 ms instead of every 5 ms.

    The ingest writer releases the GIL while SQLite inserts a statement's rows, then needs it back
    to bind the next ones; while a parsing thread (HTTP handler, tailer) runs Python it only gets
    it after the switch interval, so with 5 ms SQLite's work overlapped little with parsing. With
    ``patchd bench ingest``, six alternating pairs of runs: 0.5 ms was faster in all six, by 9%
    (HTTP) and 12% (tail) on average.
    """
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def _construct(cls: type[Component], target: str, services: Services) -> Component:
    try:
        return cls(services)
    except PatchdError:
        raise
    except Exception as err:
        raise PluginError(f"component {target}: construction failed: {err!r}") from err


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling (the daemon owns SIGTERM/SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def component_class(target: str) -> type[Component]:
    """Import ``module:Class`` of a listed component (PluginError naming it on failure)."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise PluginError(f"component {target}: import failed: {err!r}") from err
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Component)):
        raise PluginError(
            f"component {target}: {attr!r} is not a patchd.services.Component subclass"
        )
    return cls


# Fields a running serve takes from a reloaded file (None: every field of the section). The
# monitor's window sizes and intervals, and every other section, need a restart.
RELOADABLE: dict[str, frozenset[str] | None] = {
    "monitor": frozenset(
        {
            "accuracy_floor",
            "margin",
            "confidence",
            "recover_margin",
            "cooldown_s",
            "n_min",
            "horizon_events",
            "alarm",
            "drift_threshold",
            "drift_min_samples",
            "warning_confidence_drop",
        }
    ),
    "gate": None,
}


@dataclass(frozen=True)
class ReloadResult:
    config_file: str
    applied: tuple[str, ...]  # "monitor.accuracy_floor: 0.6 -> 0.97"
    restart_needed: tuple[str, ...]  # changed fields serve does not take while running

    def to_dict(self) -> dict[str, Any]:
        return {
            "config_file": self.config_file,
            "applied": list(self.applied),
            "restart_needed": list(self.restart_needed),
        }


def _changes(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) for every leaf that differs (JSON dumps); the
    entries of ``models`` compare one by one (``models.0.monitor.margin``)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if (
        prefix == "models."
        and isinstance(old, list)
        and isinstance(new, list)
        and [m["model"]["name"] for m in old] == [m["model"]["name"] for m in new]
    ):
        pairs = enumerate(zip(old, new, strict=True))
        return [c for i, (a, b) in pairs for c in _changes(a, b, f"models.{i}.")]
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _reloadable(field: str) -> bool:
    section, _, name = field.partition(".")
    if section == "models":  # models.<i>.<section>.<field>: the same rule per model
        index, _, rest = name.partition(".")
        return index.isdigit() and _reloadable(rest)
    if section not in RELOADABLE:
        return False
    names = RELOADABLE[section]
    return names is None or name.split(".")[0] in names


def plan_reload(old: Config, new: Config) -> tuple[Config, ReloadResult]:
    """The running config with ``new``'s reloadable fields, and what changed."""
    changes = [
        c
        for c in _changes(old.model_dump(mode="json"), new.model_dump(mode="json"))
        if c[0] != "config_file"
    ]
    applied = [c for c in changes if _reloadable(c[0])]
    update: dict[str, Any] = {}
    if any(field.startswith("models.") for field, _, _ in applied):  # same names, same order
        pairs = zip(old.models, new.models, strict=True)
        update["models"] = [plan_reload(a, b)[0] for a, b in pairs]
    for section in {field.partition(".")[0] for field, _, _ in applied} - {"models"}:
        names = {
            field.partition(".")[2].split(".")[0]
            for field, _, _ in applied
            if field.partition(".")[0] == section
        }
        current, wanted = getattr(old, section), getattr(new, section)
        update[section] = current.model_copy(update={n: getattr(wanted, n) for n in names})
    merged = old.model_copy(update=update)
    result = ReloadResult(
        config_file=str(old.config_file),
        applied=tuple(f"{f}: {a!r} -> {b!r}" for f, a, b in applied),
        restart_needed=tuple(f for f, _, _ in changes if not _reloadable(f)),
    )
    return merged, result


class Daemon:
    """One ``patchd serve`` process. ``run()`` blocks until shutdown and returns the exit code."""

    def __init__(self, config: Config, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.environ = os.environ if environ is None else environ
        self._state = RunState.CREATED
        self._state_lock = threading.Lock()
        self._signals = 0
        self._cold = False
        self._reload_lock = threading.Lock()
        self.started_monotonic = time.monotonic()
        self.services: Services = None  # type: ignore[assignment]  # set by start()
        self.components: list[Component] = []
        self.model_services: dict[str, Services] = {}  # per model: its components' services
        self.tailers: list[Any] = []
        self.redis: Any = None  # EmbeddedRedis when serve started one
        self._server: _Server | None = None

    @property
    def state(self) -> RunState:
        return self._state

    def _transition(self, new: RunState) -> None:
        with self._state_lock:
            if new not in _ALLOWED[self._state]:
                raise RuntimeError(f"daemon cannot go from {self._state.value} to {new.value}")
            log.info("serve state %s -> %s", self._state.value, new.value)
            self._state = new

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        try:
            self.start()
            tune_gc()
            tune_gil()
            if self._signals == 0:
                self._serve()
        except PatchdError:
            self.shutdown()
            raise
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                log.exception("patchd serve crashed")
                self._cold = True
                self.shutdown()
                return 1
            self.shutdown()
            raise DiskFullError(f"cannot write {err.filename or 'the state directory'}") from None
        except Exception:
            log.exception("patchd serve crashed")
            self._cold = True
            self.shutdown()
            return 1
        self.shutdown()
        return 0

    def _install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP: reload in a thread (a signal handler must not wait on the monitor's lock)."""
        threading.Thread(target=self._reload_logged, name="patchd-reload", daemon=True).start()

    def _reload_logged(self) -> None:
        try:
            self.reload("SIGHUP")
        except PatchdError as err:
            log.error("SIGHUP: %s", err)
        except Exception:
            log.exception("SIGHUP: reload failed; the running configuration is kept")

    # -- reload ------------------------------------------------------------------------------
    def reload(self, who: str = "admin") -> ReloadResult:
        """Re-read the config file; apply its reloadable fields (ConfigError: nothing changes)."""
        from patchd.config import load_config

        with self._reload_lock:
            path = self.config.config_file
            if path is None:
                raise ConfigError("serve was started without a config file (-c); nothing to reload")
            if self.services is None or self.state is not RunState.RUNNING:
                raise ConfigError(f"serve is {self.state.value}; reload needs it running")
            try:
                new = load_config(Path(path), self.environ)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from None
            merged, result = plan_reload(self.config, new)
            if result.applied:
                self.config = self.services.config = merged
                for name, scoped in self.model_services.items():
                    scoped.config = merged.for_model(name)
                for component in self.components:
                    component.reconfigure(component.services.config)
            log.info(
                "config reloaded from %s by %s: applied %s; changed but needing a restart: %s",
                path,
                who,
                list(result.applied) or "nothing",
                list(result.restart_needed) or "nothing",
            )
            return result

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s: warm shutdown (stop intake, flush, close); send again for cold", name)
            if self.services is not None:
                self.services.ingest.stop_intake()
        else:
            log.warning("%s again: cold shutdown (queued writes are dropped)", name)
            self._cold = True
        if self._server is not None:
            self._server.should_exit = True
            self._server.force_exit = self._cold

    # -- start -------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The ``GET /v1/status`` document: state, store counts, ingest counters, sources."""
        services = self.services
        config = services.config
        per_model: dict[str, dict[str, int]] = {}
        with services.store.read() as conn:
            for name in config.model_names:
                stored, labeled = count_predictions(conn, name)
                per_model[name] = {"predictions": stored, "labeled": labeled}
            pending = count_pending(conn)
        ingested, rejected, joined = services.ingest.stats.snapshot()
        return {
            "version": patchd_version(),
            "state": self.state.value,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            # one model: its name; several: null (see `models`)
            "model": None if config.several_models else config.model_names[0],
            "models": per_model,
            "store": {
                "path": services.store.location,
                "predictions": sum(m["predictions"] for m in per_model.values()),
                "labeled": sum(m["labeled"] for m in per_model.values()),
                "pending_labels": pending,
            },
            "ingest": {
                "queued": services.ingest.queued,
                "ingested": ingested,
                "rejected": {f"{s}/{r}": n for (s, r), n in sorted(rejected.items())},
                "labels_joined": joined,
            },
            "sources": [t.status() for t in self.tailers],
            "redis_url": services.redis_url,
            "components": sorted(services.components),
            "leader": services.leader.status(),
        }

    def start(self) -> None:
        self._transition(RunState.STARTING)
        config = self.config
        for i, source in enumerate(config.sources.tail):  # fail fast, before anything starts
            from patchd.ingest.tailer import check_glob

            try:
                check_glob(source.glob, config.sources.allowed_roots)
            except ConfigError as err:
                raise ConfigError(f"sources.tail.{i}.glob: {err}") from None
        config.state_dir.mkdir(parents=True, exist_ok=True)
        redis_url = self._start_redis()
        store = open_store(config)
        pipeline = IngestPipeline(config, store)
        self.services = Services(
            config=config,
            store=store,
            bus=EventBus(),
            metrics=CollectorRegistry(auto_describe=True),
            scheduler=BackgroundScheduler(
                timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1}
            ),
            redis_url=redis_url,
            ingest=pipeline,
            leader=Leadership.from_config(config, redis_url, store),
        )
        pipeline.start()
        self.components = self._build_components()
        self.tailers = self._build_tailers()
        self._build_app()
        self._start_parts()
        self._transition(RunState.RUNNING)

    def _start_redis(self) -> str:
        from patchd.runs.redis_embedded import ensure_redis

        self.redis, url = ensure_redis(self.config)
        return url

    def _build_components(self) -> list[Component]:
        """Every component of :data:`COMPONENTS`; a ``per_model`` one once per model (its
        metrics as one collector with a ``model`` label, its jobs and events that model's)."""
        services = self.services
        errors = job_errors_counter()
        services.metrics.register(errors)
        self.model_services = {
            view.model.name: services.for_model(view, errors) for view in self.config.per_model()
        }
        several = self.config.several_models
        built: list[Component] = []
        for target in COMPONENTS:
            cls = component_class(target)
            if not cls.per_model:
                component = _construct(cls, target, services)
                for scoped in self.model_services.values():
                    scoped.components.setdefault(component.name, component)
                services.components[component.name] = component
                for collector in component.collectors():
                    services.metrics.register(collector)
                built.append(component)
                log.info("component %s (%s) loaded", component.name, target)
                continue
            by_model: dict[str, list[Any]] = {}
            for model, scoped in self.model_services.items():
                component = _construct(cls, target, scoped)
                scoped.components[component.name] = component
                services.components[f"{component.name}:{model}" if several else component.name] = (
                    component
                )
                by_model[model] = list(component.collectors())
                built.append(component)
                log.info("component %s of model %s (%s) loaded", component.name, model, target)
            services.metrics.register(ModelLabelCollector(by_model))
        return built

    def _build_tailers(self) -> list[Any]:
        if not self.config.sources.tail:
            return []
        from patchd.ingest.tailer import Tailer

        return [
            Tailer(source, self.config, self.services.ingest, self.services.store)
            for source in self.config.sources.tail
        ]

    def _build_app(self) -> None:
        services = self.services
        services.metrics.register(IngestCollector(services.ingest))
        services.metrics.register(BuildInfoCollector())
        for collector in services.leader.collectors():
            services.metrics.register(collector)
        routers = [
            status_router(lambda: self.state.value, self.status),
            ingest_router(services.ingest),
        ]
        routers.append(metrics_router(services.metrics))
        routers.append(admin_router(lambda who: self.reload(who).to_dict()))
        scoped: dict[str, list[Any]] = {name: [] for name in self.model_services}
        for component in self.components:
            if component.per_model:
                scoped[component.services.config.model.name].extend(component.routers())
            else:
                routers.extend(component.routers())
        names = list(scoped)
        if not self.config.several_models:  # one model: the unprefixed routes stay
            routers.extend(scoped[names[0]])
        routers.extend(scoped_router(name, found) for name, found in scoped.items())
        unscoped = model_scoped_routes(scoped[names[0]]) if self.config.several_models else []
        routers.append(models_router(names, unscoped))
        tokens = TokenStore.from_config(self.config, self.environ)
        dispatch = [(ModelDispatch, {"routes": unscoped, "resolve": self._model_of})]
        self.app = create_app(
            routers,
            allowed_hosts=self.config.api.allowed_hosts,
            max_body_bytes=self.config.api.max_body_bytes,
            state={"tokens": tokens, "services": services, "daemon": self},
            middleware=dispatch if self.config.several_models else (),
        )

    def _model_of(self, kind: str, ident: str) -> str | None:
        """The model of run or candidate ``ident`` (None: no such record)."""
        from patchd.promotion.component import CandidatesComponent
        from patchd.runs.component import RunsComponent

        first = self.config.model_names[0]  # any model's component reads every record by id
        try:
            if kind == "run":
                return self.services.component_for("runs", first, RunsComponent).get(ident).model
            if kind == "candidate":
                found = self.services.component_for("candidates", first, CandidatesComponent)
                return found.get(ident).model
        except NotFoundError:
            return None
        return None

    def _start_parts(self) -> None:
        from patchd.store.retention import Retention

        for component in self.components:
            component.start()
        self.services.leader.start()  # takeover duties run here when this replica leads
        retention = Retention(self.config, self.services.store)
        self.services.scheduler.add_job(
            self.services.leader.guard(retention.run),
            "interval",
            seconds=self.config.store.retention_interval_s,
            id="ingest:retention",
            name="store retention",
        )
        self.services.scheduler.start()
        for tailer in self.tailers:
            tailer.start()

    def _serve(self) -> None:
        api = self.config.api
        if api.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("the admin API listens on %s, not loopback: keep tokens secret", api.host)
        uv_config = uvicorn.Config(
            self.app,
            host=api.host,
            port=api.port,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=15,
            server_header=False,
        )
        self._server = _Server(uv_config)
        log.info(
            "serving the API on http://%s:%d (model%s %s)",
            api.host,
            api.port,
            "s" if self.config.several_models else "",
            ", ".join(self.config.model_names),
        )
        try:
            self._server.run()
        except SystemExit:  # uvicorn exits the process when it cannot bind; we clean up first
            log.error("uvicorn stopped during startup")
        if not self._server.started and self._signals == 0:
            raise PatchdError(f"the API could not listen on {api.host}:{api.port} (port in use?)")

    # -- stop --------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Warm unless a second signal (or a crash) made it cold. Idempotent."""
        if self._state in (RunState.STOPPED, RunState.STOPPING):
            return
        if self._state is RunState.CREATED:
            self._transition(RunState.STOPPED)
            return
        self._transition(RunState.STOPPING)
        services = self.services
        if services is not None:
            services.ingest.stop_intake()
            for tailer in self.tailers:
                tailer.stop()
            self._flush()
            services.ingest.stop(drain=not self._cold)
            self._stop_components()
            services.leader.stop()
            services.store.close()
        if self.redis is not None:
            self.redis.stop()
        self._transition(RunState.STOPPED)

    def _flush(self) -> None:
        deadline = time.monotonic() + 60
        while not self._cold and time.monotonic() < deadline:
            if self.services.ingest.flush(timeout=0.2):
                return

    def _stop_components(self) -> None:
        scheduler = self.services.scheduler
        if scheduler.running:
            scheduler.shutdown(wait=not self._cold)
        for component in reversed(self.components):
            try:
                component.stop()
            except Exception:
                log.exception("component %s failed to stop", component.name)

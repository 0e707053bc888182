from __future__ import annotations

from pathlib import Path

from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from patchd.config import build_config
from patchd.domain import DomainEvent, EventBus, PatchRequested
from patchd.monitor.trigger import patch_requests, request_patch
from patchd.runs.component import RunsComponent
from patchd.services import Services
from patchd.store.backend import open_store


def services_for(tmp_path: Path, store: dict[str, object], **trigger: object) -> Services:
    """Services on ``store`` (the tests take ``backend_store_config``: SQLite, then Postgres)."""
    config = build_config(
        {
            "state_dir": str(tmp_path),
            "model": {"name": "m"},
            "trigger": {"min_interval_s": 0, **trigger},
            "store": store,
        }
    )
    return Services(
        config,
        open_store(config),
        EventBus(),
        CollectorRegistry(),
        BackgroundScheduler(),
        "redis://x",
    )  # noqa: E501


def requests(services: Services) -> list[dict]:
    with services.store.read() as conn:
        return patch_requests(conn)


def test_without_the_runs_component_the_request_is_recorded_once(
    tmp_path: Path, backend_store_config: dict[str, object]
) -> None:
    services = services_for(tmp_path, backend_store_config)
    published: list[DomainEvent] = []
    services.bus.subscribe(PatchRequested, published.append)
    assert request_patch(services, "m", "site=C degraded").outcome == "recorded"
    assert request_patch(services, "m", "site=B degraded").outcome == "already_open"
    assert [r["reason"] for r in requests(services)] == ["site=C degraded"]
    assert len(published) == 1


def test_disabled_and_min_interval(tmp_path: Path) -> None:
    off = services_for(tmp_path / "a", {"path": str(tmp_path / "a.db")}, enabled=False)
    assert request_patch(off, "m", "x").outcome == "disabled" and requests(off) == []
    spaced = services_for(tmp_path / "b", {"path": str(tmp_path / "b.db")}, min_interval_s=3600)
    assert request_patch(spaced, "m", "x", now=1000.0).outcome == "recorded"
    assert request_patch(spaced, "m", "y", now=2000.0).outcome == "too_soon"


class FakeRuns(RunsComponent):
    def __init__(self) -> None:  # no redis: only request_run is used
        self.calls: list[tuple[str, str]] = []

    def request_run(self, model: str, reason: str, recipe: dict | None = None):  # noqa: ANN201
        self.calls.append((model, reason))
        if len(self.calls) > 1:
            return None
        return type("Rec", (), {"id": "run-1"})()


def test_with_the_runs_component_a_run_is_created_and_one_stays_open(
    tmp_path: Path, backend_store_config: dict[str, object]
) -> None:
    services = services_for(tmp_path, backend_store_config)
    runs = FakeRuns()
    services.components["runs"] = runs
    first = request_patch(services, "m", "site=C degraded")
    assert (first.outcome, first.run_id) == ("run_created", "run-1")
    assert request_patch(services, "m", "again").outcome == "already_open"
    assert len(runs.calls) == 2
    assert requests(services)[0]["run_id"] == "run-1"


def test_monitor_modules_import_neither_evidently_nor_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, patchd.monitor.component, patchd.monitor.metrics, patchd.monitor.api, "
        "patchd.cli.monitor; heavy = ('evidently', 'torch', 'sklearn'); "
        "bad = [m for m in heavy if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

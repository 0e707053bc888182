"""Daemon wiring: component loading rules and the run-state machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from patchd.config import build_config
from patchd.daemon import Daemon, RunState, component_class
from patchd.exceptions import ConfigError, PluginError
from patchd.services import Component


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "pd_good.py").write_text(
        "from patchd.services import Component\nclass Good(Component):\n    name = 'good'\n"
    )
    (tmp_path / "pd_broken.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "pd_notcomp.py").write_text("class NotComponent:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("pd_good", "pd_broken", "pd_notcomp"):
        sys.modules.pop(name, None)


def test_component_import_errors_name_the_component(modules: Path) -> None:
    with pytest.raises(PluginError, match="pd_does_not_exist:X: import failed"):
        component_class("pd_does_not_exist:X")
    with pytest.raises(PluginError, match="patchd.no_such_package.mod:X: import failed"):
        component_class("patchd.no_such_package.mod:X")
    assert issubclass(component_class("pd_good:Good"), Component)
    with pytest.raises(PluginError, match="pd_broken:X: import failed.*boom at import"):
        component_class("pd_broken:X")
    with pytest.raises(PluginError, match="not a patchd.services.Component"):
        component_class("pd_notcomp:NotComponent")
    with pytest.raises(PluginError, match="not a patchd.services.Component"):
        component_class("pd_good:Missing")


def test_state_machine_refuses_bad_transitions(tmp_path: Path) -> None:
    daemon = Daemon(build_config({"state_dir": str(tmp_path)}), environ={})
    assert daemon.state is RunState.CREATED
    with pytest.raises(RuntimeError, match="cannot go from created to running"):
        daemon._transition(RunState.RUNNING)
    daemon.shutdown()
    assert daemon.state is RunState.STOPPED
    daemon.shutdown()  # idempotent


def test_bad_tail_glob_fails_before_anything_starts(tmp_path: Path) -> None:
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "sources": {"allowed_roots": [str(tmp_path)], "tail": [{"glob": "/etc/*.conf"}]},
        }
    )
    daemon = Daemon(config, environ={})
    with pytest.raises(ConfigError, match=r"sources\.tail\.0\.glob: .*outside"):
        daemon.start()
    assert not (tmp_path / "state").exists()  # nothing was created

"""What `patchd serve` and `patchd status` import must not pull in the heavy ML stack."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "diffusers", "sklearn", "open_clip", "transformers")
SERVE_MODULES = [
    "patchd.cli",
    "patchd.cli.serve",
    "patchd.cli.config_cmd",
    "patchd.daemon",
    "patchd.api.app",
    "patchd.tailer",
    "patchd.api_client",
    # components serve builds and the modules `patchd status` needs (when they exist)
    "patchd.monitor.component",
    "patchd.cli.monitor",
    "patchd.runs",
    "patchd.candidates",
    "patchd.registry",
    "patchd.plugins.sources.kserve",
    "patchd.plugins.sources.seldon",
]


def present(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("module", [m for m in SERVE_MODULES if present(m)])
def test_serve_side_module_does_not_import_heavy_ml(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} imported {out.stdout.strip()}"


def test_the_daemon_builds_components_without_heavy_ml(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Importing every listed component class (as serve does) keeps torch out."""
    code = (
        "import sys\n"
        "from patchd.components import COMPONENTS\n"
        "from patchd.daemon import component_class\n"
        "for target in COMPONENTS: component_class(target)\n"
        f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""

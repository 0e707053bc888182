"""The top-level ``workers/`` and ``plugins/`` folders are runnable entry points of the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from patchd.plugins.catalog import TABLES

ROOT = Path(__file__).resolve().parents[2]


def run(folder: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, folder, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_python_plugins_lists_every_built_in_plugin() -> None:
    out = run("plugins")
    assert out.returncode == 0, out.stderr
    rows = {tuple(line.split()) for line in out.stdout.splitlines()}
    expected = {(k, n, t) for k, table in TABLES.items() for n, t in table.items()}
    assert rows == expected


def test_every_catalog_entry_names_a_module_file_of_the_package() -> None:
    for table in TABLES.values():
        for target in table.values():
            module, _, cls = target.partition(":")
            path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
            assert path.is_file(), target
            assert f"class {cls}(" in path.read_text(), target


def test_python_workers_is_patchd_worker() -> None:
    out = run("workers", "--help")
    assert out.returncode == 0, out.stderr
    assert "Run a patch worker" in out.stdout and "--queues" in out.stdout

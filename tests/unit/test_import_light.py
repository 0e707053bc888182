"""What `patchd serve` and `patchd status` import must not pull in the heavy ML stack."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "diffusers", "sklearn", "open_clip", "transformers")
# the object-store client comes in only when an s3:// root is configured (patchd.store.blobs)
HEAVY += ("s3fs", "botocore", "aiobotocore")
SERVE_MODULES = [
    "patchd.cli",
    "patchd.cli.serve",
    "patchd.cli.config_cmd",
    "patchd.daemon",
    "patchd.api.app",
    "patchd.ingest.tailer",
    "patchd.api.client",
    # the modules `patchd status` and serve's components need (those that exist)
    "patchd.cli.monitor",
    "patchd.runs.component",
    "patchd.promotion.component",
    "patchd.promotion.registry",
]

# One fresh interpreter imports each module in turn (then every listed component class, as serve
# does) and reports which heavy package appeared after which import.
PROBE = """
import importlib, importlib.util, json, sys
heavy, modules = {heavy!r}, {modules!r}
report = {{}}
def exists(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
for name in modules:
    if exists(name):
        importlib.import_module(name)
        report[name] = sorted(m for m in heavy if m in sys.modules)
from patchd.daemon import COMPONENTS
from patchd.daemon import component_class
for target in COMPONENTS:
    component_class(target)
    report[target] = sorted(m for m in heavy if m in sys.modules)
print(json.dumps(report))
"""


def test_serve_and_status_imports_do_not_import_torch() -> None:
    code = PROBE.format(heavy=HEAVY, modules=SERVE_MODULES)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert "patchd.daemon" in report and "patchd.cli" in report
    culprits = {name: heavy for name, heavy in report.items() if heavy}
    assert culprits == {}, f"first import that pulled in heavy ML: {next(iter(culprits))}"

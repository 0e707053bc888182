"""The README's main command, end to end: `patchd demo --fast --approve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The live worst-group accuracy after promotion must beat the one before by at least this much.
# Measured on colored-digits (2-core machine, 2026-11-23): 0.00 → 0.77 with the demo's budget
# (20 fine-tune epochs); 0.00 → 0.42..0.54 with 6 epochs.
MIN_GAIN = 0.4


def test_demo_fast_end_to_end(tmp_path: Path, clean_redis: str) -> None:
    env = {**os.environ, "PATCHD_REDIS__URL": clean_redis, "PATCHD_REDIS__EMBEDDED": "never"}
    env.pop("PATCHD_TOKEN", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "patchd",
            "demo",
            "--fast",
            "--approve",
            "--workdir",
            str(tmp_path / "demo"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "demo" / "result.json").read_text())
    before, after = result["monitor_worst_before"], result["monitor_worst_after"]
    assert before is not None and after is not None, result
    assert after >= before + MIN_GAIN, result
    assert "summary" in proc.stdout

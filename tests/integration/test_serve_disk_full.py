"""`patchd serve` on a full disk says "disk full" (and exits 1), not "crashed ... disk I/O error".

The full disk is a 256 KiB tmpfs filled to the last block; mounting one needs root, so the test
is skipped elsewhere.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import PATCHD, TOKEN, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        fd = os.open(mount / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
        finally:
            os.close(fd)
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_serve_on_a_full_disk_says_disk_full(full_disk: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, {"state_dir": str(full_disk / "state"), "model": {"name": "m"}})
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    done = subprocess.run(
        [PATCHD, "serve", "-c", str(config)], capture_output=True, env=env, timeout=60
    )
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert "disk full" in err and str(full_disk / "state") in err, err
    assert "crashed" not in err and "Traceback" not in err, err

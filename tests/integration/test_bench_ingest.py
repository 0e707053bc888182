"""``patchd bench ingest`` end to end at a tiny size: every event it sends is stored exactly once.

The benchmark's figures are only worth reading if the runs it times really ingested what they sent,
so this checks the stored count (HTTP batches + the 100-event requests + the tailed file) of a
real serve, and the shape of the JSON the README table is written from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from patchd.bench.ingest import (
    FEW_PENDING,
    LATE_BATCH,
    LATE_BATCHES,
    SMALL_BATCH,
    SMALL_REQUESTS,
)

EVENTS = 2_000
SMALL_BATCH_EVENTS = SMALL_REQUESTS * SMALL_BATCH  # the 100-event requests


def test_bench_ingest_stores_every_event_it_times(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    exe = str(Path(sys.executable).with_name("patchd"))
    cmd = [exe, "bench", "ingest", "--events", str(EVENTS), "--batch", "500", "--repeat", "2"]
    done = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["repeats"] == 2
    assert len(result["runs"]) == 2
    assert result["stored"] == 2 * EVENTS + SMALL_BATCH_EVENTS
    rates = sorted(run["http_events_per_s"] for run in result["runs"])
    assert rates[0] <= result["http_events_per_s"] <= rates[-1]
    assert all(run["tail_events_per_s"] > 0 for run in result["runs"])
    assert set(result["targets_met"]) == {
        "http_events_per_s",
        "tail_events_per_s",
        "rss_mib",
        "join_within_2x",
    }
    # the late-label phase joined every label it left pending first
    joined = LATE_BATCHES * (FEW_PENDING + LATE_BATCH)
    assert all(run["labels_joined"] == joined for run in result["runs"])
    assert result["backlog_batch_p50_ms"] > 0 and result["plain_batch_p50_ms"] > 0
    assert "median of 2 runs" in done.stdout

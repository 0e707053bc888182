"""A fresh monitor reads the window it starts from in bounded steps, oldest first, then keeps up
with whatever was labeled since (``monitor.catch_up_events_per_tick``)."""

from __future__ import annotations

import time
from pathlib import Path

from patchd.bench.models import bench_data, insert
from patchd.config import build_config
from patchd.monitor.engine import ModelMonitor
from patchd.store.backend import open_store


def test_first_ticks_read_the_window_in_bounded_steps(tmp_path: Path) -> None:
    data = bench_data(tmp_path / "state", 1, 2500)
    data["monitor"].update({"catch_up_events_per_tick": 1000, "reference_window": 100})
    config = build_config(data)
    config.state_dir.mkdir(parents=True)
    view = config.for_model("m00")
    store = open_store(config)
    try:
        insert(store, "m00", 3000, 0, "old", time.time() - 10)  # 500 older than the window
        monitor = ModelMonitor(view, "m00")
        seen = []
        for round_ in range(4):
            if round_ == 1:  # labeled while it catches up: read once it caught up
                insert(store, "m00", 200, 1, "new", time.time())
            snap, _ = monitor.tick(store)
            seen.append(snap.n)
        assert seen == [1000, 2000, 2500, 2500]
        assert monitor.catch_up is None
        # the window holds the newest 2500: 2300 of the old ones and the 200 new
        assert monitor.window.events.ts.max() > time.time() - 5
    finally:
        store.close()

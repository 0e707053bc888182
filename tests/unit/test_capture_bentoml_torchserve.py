"""BentoML monitor files and TorchServe handler traffic as upstream produces them.

The BentoML fixtures in tests/fixtures/bentoml/ were written by a real ``bentoml.monitor``
(generate.py beside them, versions in expected.json); TorchServe requests go through TorchServe's
own ``Service.retrieve_data_for_inference`` and ``Context`` (the ``torchserve`` dev dependency).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import logging.handlers
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from patchd.config import Config, build_config
from patchd.exceptions import ConfigError, ValidationError
from patchd.ingest import tailer as tailer_module
from patchd.ingest.metrics import IngestCollector
from patchd.ingest.pipeline import IngestPipeline
from patchd.ingest.records import EventParser
from patchd.ingest.tailer import Tailer
from patchd.plugins.sources.mapping import localize, map_record, numeric_list
from patchd.store.db import Store
from tests.capture_fixtures.bentoml_torchserve import (
    CLASS_NAMES,
    TorchServeBatch,
    _frame,
    bentoml_monitor,
    handler_events,
    torchserve_batches,
    write_bentoml,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "bentoml"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
FIXTURE_IMAGES = "/srv/bento/images"


def documented_glob() -> str:
    """The BentoML tail glob docs/capture.md tells users to configure."""
    text = (ROOT / "docs" / "capture.md").read_text()
    found = re.search(r'kind: bentoml, glob: "([^"]+)"', text)
    assert found, "docs/capture.md has no `kind: bentoml, glob: ...` example"
    return found.group(1)


def config_for(tmp_path: Path, data_dir: Path, images: str, **source: Any) -> Config:
    return build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"name": "skin", "class_names": list(CLASS_NAMES)},
            "groups": {"attributes": ["site"]},
            "sources": {
                "allowed_roots": [str(tmp_path / "logs"), images],
                "tail": [
                    {
                        "name": "bento",
                        "kind": "bentoml",
                        "glob": str(data_dir / Path(documented_glob()).name),
                        **source,
                    }
                ],
            },
        }
    )


class Bento:
    """A bentoml tail source over ``data_dir`` with a real store and pipeline."""

    def __init__(self, tmp_path: Path, data_dir: Path, images: str, **source: Any) -> None:
        self.config = config_for(tmp_path, data_dir, images, **source)
        self.store = Store.open(self.config.store_path)
        self.pipeline = IngestPipeline(self.config, self.store)
        self.pipeline.start()
        self.tailer = self.new_tailer()

    def new_tailer(self) -> Tailer:
        tailer = Tailer(self.config.sources.tail[0], self.config, self.pipeline, self.store)
        tailer._stored = tailer._load_offsets()  # what start() does, without the thread
        return tailer

    def poll(self, times: int = 2) -> None:
        for _ in range(times):
            self.tailer.poll_once()
            self.tailer._drain_inflight()

    def rows(self) -> dict[str, tuple[int, float, str | None, str]]:
        with self.store.read() as conn:
            found = conn.execute("SELECT id, pred, ts, input_uri, group_key FROM predictions")
            return {r[0]: (r[1], r[2], r[3], r[4]) for r in found.fetchall()}

    def rejected(self) -> dict[str, int]:
        return {r: n for (s, r), n in self.pipeline.stats.snapshot()[1].items() if s == "bento"}

    def dropped(self) -> dict[str, int]:
        return {r: n for (s, r), n in self.pipeline.stats.dropped_inputs().items() if s == "bento"}

    def close(self) -> None:
        self.tailer.stop()
        self.pipeline.stop()
        self.store.close()


@pytest.fixture
def real_monitor(tmp_path: Path) -> Iterator[Bento]:
    logs = tmp_path / "logs"
    shutil.copytree(FIXTURES / "monitoring", logs / "monitoring")
    bento = Bento(
        tmp_path, logs / "monitoring/skin/data", FIXTURE_IMAGES, timezone=EXPECTED["writer_tz"]
    )
    yield bento
    bento.close()


# ----------------------------------------------------------------------------- BentoML


def test_real_monitor_files_are_read_in_the_writers_zone(real_monitor: Bento) -> None:
    """Written by bentoml.monitor under TZ=Asia/Tokyo: every stored time lies within the UTC
    bounds measured around its request (read as UTC it would be 9 h late)."""
    real_monitor.poll()
    rows = real_monitor.rows()
    assert {rid: row[0] for rid, row in rows.items()} == EXPECTED["stored"]
    assert EXPECTED["writer_utc_offset_s"] == 9 * 3600
    for rid, (_, ts, _, _) in rows.items():
        bounds = EXPECTED["request_bounds"][rid]
        assert bounds["before"] - 1e-3 <= ts <= bounds["after"] + 1e-3, (rid, ts, bounds)


def test_real_monitor_numpy_values_and_unusable_inputs(real_monitor: Bento) -> None:
    """numpy text ("2", "[0.1 0.2 0.7]", ["0.6", ...]) is read; an s3:// or outside-the-roots
    input is dropped and counted while its prediction is stored."""
    real_monitor.poll()
    rows = real_monitor.rows()
    assert {rid: row[2] for rid, row in rows.items() if row[2]} == EXPECTED["inputs"]
    assert rows["102"][2] is None and rows["103"][2] is None  # stored without their inputs
    assert rows["101"][3] == "site=A" and rows["102"][3] == "site=B"
    assert real_monitor.dropped() == EXPECTED["inputs_dropped"]
    assert real_monitor.rejected() == EXPECTED["rejected"]
    registry = CollectorRegistry()
    registry.register(IngestCollector(real_monitor.pipeline))
    text = generate_latest(registry).decode()
    line = 'patchd_ingest_inputs_dropped_total{reason="path_not_allowed",source="bento"} 1.0'
    assert line in text


def test_documented_glob_matches_bentoml_files_and_rotation(tmp_path: Path) -> None:
    pattern = Path(documented_glob()).name
    names = [Path(f).name for f in EXPECTED["files"] if f.startswith("skin/data/")]
    assert names == ["data.0.log", "data.0.log.2026-11-24"]
    assert all(fnmatch.fnmatch(n, pattern) for n in names), (pattern, names)
    assert not fnmatch.fnmatch("schema.0.log", pattern)
    handler = daily_handler(tmp_path / "data.3.log")  # the handler BentoML configures
    handler.emit(record("x"))
    rotated = rollover(handler, "2026-12-31")
    handler.close()
    assert fnmatch.fnmatch(rotated.name, pattern) and rotated.name == "data.3.log.2026-12-31"


def test_default_zone_is_the_machines_local_zone(tmp_path: Path) -> None:
    """Isolated in a child process with TZ=Asia/Tokyo (this process' zone is not touched)."""
    code = (
        "from patchd.config import TailSourceConfig\n"
        "from patchd.plugins.sources.mapping import map_record\n"
        "from patchd.ingest.fields import parse_timestamp\n"
        "zone = TailSourceConfig(glob='/x/*.log', kind='bentoml').zone()\n"
        "line = {'pred': 1, 'timestamp': '2026-11-24T18:00:00.500000', 'request_id': '1'}\n"
        "ts = map_record('bentoml', {}, line, zone)['ts']\n"
        "print(zone, ts, parse_timestamp(ts, 0.0))\n"
    )
    env = {**os.environ, "TZ": "Asia/Tokyo"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    zone, ts, epoch = done.stdout.split()
    assert zone == "local" and ts == "2026-11-24T18:00:00.500000+09:00"
    assert float(epoch) == 1795510800.5  # 2026-11-24T09:00:00.5Z


def test_named_zone_and_aware_times() -> None:
    assert localize("2026-11-24T18:00:00", "Asia/Tokyo") == "2026-11-24T18:00:00+09:00"
    assert localize("2026-07-01T08:00:00", "America/New_York") == "2026-07-01T08:00:00-04:00"
    assert localize("2026-11-24T18:00:00Z", "Asia/Tokyo") == "2026-11-24T18:00:00Z"  # kept
    assert localize(1795510800.5, "Asia/Tokyo") == 1795510800.5
    line = {"pred": 1, "timestamp": "2026-11-24T18:00:00", "request_id": "1"}
    naive = map_record("mapping", {"pred": "pred", "ts": "timestamp"}, line)["ts"]
    assert naive == line["timestamp"]  # kind mapping without timezone: left for serve (UTC)
    with pytest.raises(ConfigError, match="timezone.*not a time zone"):
        build_config(
            {"sources": {"allowed_roots": ["/tmp"],
                         "tail": [{"glob": "/tmp/*.log", "kind": "bentoml",
                                   "timezone": "Asia/Tokio"}]}}
        )  # fmt: skip


def test_numpy_text_is_read_back() -> None:
    wrapped = (  # str(np.arange(8) / 7): numpy wraps at 75 characters
        "[0.         0.14285714 0.28571429 0.42857143 0.57142857 0.71428571\n 0.85714286 1.  ]"
    )
    assert numeric_list(wrapped, "probs") == pytest.approx(
        [0.0, 0.14285714, 0.28571429, 0.42857143, 0.57142857, 0.71428571, 0.85714286, 1.0]
    )
    assert numeric_list("[[0.1 0.2 0.7]]", "probs") == [0.1, 0.2, 0.7]
    assert numeric_list(["0.6", "0.4"], "probs") == [0.6, 0.4]
    assert numeric_list("[1.e-03 9.99e-01]", "probs") == [0.001, 0.999]
    assert numeric_list([0.5, 0.5], "probs") == [0.5, 0.5]
    assert numeric_list("caption", "probs") == "caption"  # not numpy text: validation names it
    for bad, reason in (
        ("[0.001 0.001 ... 0.001]", "invalid_value"),
        ("[[1 2]\n [3 4]]", "invalid_value"),
        ("[0.1 abc]", "wrong_type"),
        (["0.1", "x"], "wrong_type"),
    ):
        with pytest.raises(ValidationError) as err:
            numeric_list(bad, "probs")
        assert err.value.reason == reason, bad


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=300),
    st.sampled_from(["float32", "float64"]),
    st.booleans(),
)
def test_numpy_text_round_trips_what_numpy_prints(
    values: list[float], dtype: str, as_row: bool
) -> None:
    """Whatever str(ndarray) prints below numpy's summarization threshold (wrapped lines,
    scientific notation, padding) reads back to the array's values."""
    array = np.array([values] if as_row else values, dtype=dtype)
    read = numeric_list(str(array), "probs")
    assert read == pytest.approx(array.ravel().tolist(), rel=1e-6, abs=1e-8)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60) | st.lists(st.text(max_size=8), max_size=5))
def test_numpy_text_parser_raises_only_validation_errors(value: object) -> None:
    try:
        numeric_list(value, "probs")
    except ValidationError:
        pass


def test_bentoml_reserved_columns_and_none_request_id() -> None:
    line = {"pred": "1", "site": "B", "timestamp": "2026-11-24T18:00:00", "request_id": "7",
            "trace_id": "123"}  # fmt: skip
    event = map_record("bentoml", {}, line)
    assert event["groups"] == {"site": "B"} and event["id"] == "7"
    with pytest.raises(ValidationError) as err:
        map_record("bentoml", {}, {**line, "request_id": "None"})
    assert err.value.reason == "missing_field" and "per-row id" in str(err.value)


def test_decimal_class_names_are_indices_unless_they_are_names(tmp_path: Path) -> None:
    parser = EventParser(build_config({"model": {"name": "m", "class_names": list(CLASS_NAMES)}}))
    assert parser.prediction({"id": "a", "pred": "2"}, "t").pred == 2
    assert parser.prediction({"id": "b", "pred": "benign"}, "t").pred == 0
    for bad in ("5", "zebra", "-1", "1.0"):
        with pytest.raises(ValidationError) as err:
            parser.prediction({"id": "c", "pred": bad}, "t")
        assert err.value.reason == "invalid_value", bad
    named = EventParser(build_config({"model": {"name": "m", "class_names": ["1", "0"]}}))
    assert named.prediction({"id": "d", "pred": "0"}, "t").pred == 1  # a name wins


# -- rotation -----------------------------------------------------------------------------------


def daily_handler(path: Path) -> logging.handlers.TimedRotatingFileHandler:
    handler = logging.handlers.TimedRotatingFileHandler(path, when="D")  # BentoML's default
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("bentoml_monitor_data", logging.INFO, "", 0, message, None, None)


def rollover(handler: logging.handlers.TimedRotatingFileHandler, day: str) -> Path:
    start = time.mktime(time.strptime(day + " 12:00", "%Y-%m-%d %H:%M"))
    handler.rolloverAt = int(start) + handler.interval
    handler.doRollover()
    return Path(handler.baseFilename + "." + day)


def bento_line(i: int) -> str:
    return json.dumps({"pred": i % 3, "timestamp": "2026-11-24T18:00:00.000001",
                       "request_id": str(5000 + i), "trace_id": "0"})  # fmt: skip


def test_rotation_during_a_restart_loses_and_repeats_nothing(tmp_path: Path) -> None:
    """Serve stops, the monitor writes on and rolls over, serve restarts: with the documented
    glob the rotated file is found again and read on from its stored offset."""
    data = tmp_path / "logs" / "monitoring" / "skin" / "data"
    data.mkdir(parents=True)
    handler = daily_handler(data / "data.0.log")
    bento = Bento(tmp_path, data, str(tmp_path / "logs"), timezone="UTC")
    for i in range(30):
        handler.emit(record(bento_line(i)))
    bento.poll()
    bento.tailer.stop()  # serve stops
    for i in range(30, 50):
        handler.emit(record(bento_line(i)))
    rollover(handler, "2026-11-24")
    for i in range(50, 60):
        handler.emit(record(bento_line(i)))
    handler.close()
    bento.tailer = bento.new_tailer()  # serve restarts: offsets from the store
    bento.poll(3)
    assert len(bento.rows()) == 60 and bento.rejected() == {}
    assert bento.tailer.lines_read == 30  # only what was written while it was down
    bento.close()


def test_a_closed_file_matched_again_is_read_on_not_from_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "logs" / "data"
    data.mkdir(parents=True)
    live = data / "data.0.log"
    live.write_text("".join(bento_line(i) + "\n" for i in range(20)))
    bento = Bento(tmp_path, data, str(tmp_path / "logs"), timezone="UTC")
    bento.poll()
    os.rename(live, data / "parked")  # leaves the glob: closed after draining
    bento.poll(tailer_module.GONE_POLLS + 1)
    assert bento.tailer.files == {}
    os.rename(data / "parked", data / "data.0.log.2026-11-24")  # matched again, one more line
    with open(data / "data.0.log.2026-11-24", "a") as fh:
        fh.write(bento_line(20) + "\n")
    bento.poll()
    assert len(bento.rows()) == 21 and bento.rejected() == {}  # no duplicate re-read
    monkeypatch.setattr(tailer_module, "IDLE_CLOSE_POLLS", 2)
    bento.poll(3)
    assert bento.tailer.files == {}  # idle files hold no descriptor
    bento.poll(2)
    assert bento.tailer.files == {}  # unchanged: not reopened
    with open(data / "data.0.log.2026-11-24", "a") as fh:
        fh.write(bento_line(21) + "\n")
    bento.poll()
    assert len(bento.rows()) == 22 and bento.rejected() == {}
    bento.close()


# ----------------------------------------------------------------------------- TorchServe


def test_torchserve_headers_are_matched_case_insensitively() -> None:
    """Header names reach the handler as the client sent them (TorchServe's own parsing)."""
    frames = (
        _frame("r-1", {"X-Patchd-Group-Site": "B", "X-Patchd-Input-Uri": "/srv/i/1.png"}),
        _frame("r-2", {"x-patchd-group-site": "C"}),
    )
    batch = TorchServeBatch(frames, ({"2": 0.7, "0": 0.3}, {"benign": 0.9}), (200, 200))
    events = handler_events((batch,)).events
    assert events == [
        {"pred": "2", "id": "r-1", "model": "skin", "groups": {"site": "B"},
         "input": {"uri": "/srv/i/1.png"}},
        {"pred": "benign", "id": "r-2", "model": "skin", "groups": {"site": "C"}},
    ]  # fmt: skip


def test_torchserve_describe_and_failed_requests_are_not_logged() -> None:
    describe = TorchServeBatch((_frame("d", {"describe": "True"}),), ({"model": "skin"},), (200,))
    failed = TorchServeBatch(
        (_frame("f", {}), _frame("ok", {})), ({"error": "x"}, [0.2, 0.8]), (500, 200)
    )
    events = handler_events((describe, failed)).events
    assert [e["id"] for e in events] == ["ok"]


def test_torchserve_object_store_input_is_not_sent_and_the_prediction_kept() -> None:
    frames = (_frame("s", {"X-Patchd-Input-Uri": "s3://bucket/1.png"}),)
    run = handler_events((TorchServeBatch(frames, ([0.2, 0.8],), (200,)),))
    assert run.events == [{"pred": 1, "probs": [0.2, 0.8], "id": "s", "model": "skin"}]
    assert run.inputs_dropped == {"not_local": 1}


# ----------------------------------------------------------------------------- replay helpers


def test_bentoml_generator_counts_hold_through_the_tailer(tmp_path: Path) -> None:
    images = tmp_path / "logs" / "images"
    files = bentoml_monitor(230, images_root=str(images), rows_per_file=100)
    assert [name for name, _ in files.files] == [
        "data.0.log.2026-11-23", "data.0.log.2026-11-24", "data.0.log"]  # fmt: skip
    data = tmp_path / "logs" / "monitoring" / "skin" / "data"
    write_bentoml(data, files)
    bento = Bento(tmp_path, data, str(images), timezone=files.zone)
    bento.poll(3)
    rows = bento.rows()
    expected = files.expected
    assert len(rows) == expected.stored == 138
    assert bento.rejected() == expected.rejected
    assert bento.dropped() == expected.inputs_dropped
    assert sum(1 for r in rows.values() if r[2]) == expected.inputs_kept
    assert {rid: r[1] for rid, r in rows.items()} == pytest.approx(dict(expected.ts))
    bento.close()


def test_torchserve_generator_counts_hold_through_ingest(tmp_path: Path) -> None:
    images = tmp_path / "images"
    traffic = torchserve_batches(84, images_root=str(images))
    run = handler_events(traffic.batches)
    events = run.events
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"name": "skin", "class_names": list(CLASS_NAMES)},
            "groups": {"attributes": ["site"]},
            "sources": {"allowed_roots": [str(images)]},
        }
    )
    store = Store.open(config.store_path)
    pipeline = IngestPipeline(config, store)
    pipeline.start()
    result = pipeline.submit_predictions(events, "torchserve")
    expected = traffic.expected
    assert len(events) == 84 - expected.not_logged
    assert run.inputs_dropped == expected.inputs_dropped == {"not_local": 10}
    assert result.accepted == expected.stored
    reasons: dict[str, int] = {}
    for err in result.rejected:
        reasons[err.reason] = reasons.get(err.reason, 0) + 1
    assert reasons == expected.rejected
    with store.read() as conn:
        inputs = conn.execute("SELECT COUNT(*) FROM predictions WHERE input_uri IS NOT NULL")
        assert inputs.fetchone()[0] == expected.inputs_kept
    pipeline.stop()
    store.close()

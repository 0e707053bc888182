"""JSONL tailer: partial lines, rotation by rename, copytruncate, restart offsets, containment."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from patchd.config import Config, TailSourceConfig, build_config
from patchd.exceptions import ConfigError
from patchd.ingest.pipeline import IngestPipeline
from patchd.ingest.tailer import Tailer, check_glob
from patchd.store.db import Store
from patchd.store.predictions import count_predictions


def line(i: int | str) -> bytes:
    return orjson.dumps({"id": f"e{i}", "pred": 1, "ts": 1000.0}) + b"\n"


def cfg(tmp_path: Path, glob: str) -> Config:
    return build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"name": "model"},
            "sources": {"allowed_roots": [str(tmp_path / "logs")], "tail": [{"glob": glob}]},
        }
    )


class Harness:
    def __init__(self, tmp_path: Path, pattern: str = "app.log*") -> None:
        (tmp_path / "logs").mkdir(exist_ok=True)
        self.logs = tmp_path / "logs"
        self.config = cfg(tmp_path, str(self.logs / pattern))
        self.store = Store.open(self.config.store_path)
        self.pipeline = IngestPipeline(self.config, self.store)
        self.pipeline.start()
        self.tailer = self.new_tailer()

    def new_tailer(self) -> Tailer:
        tailer = Tailer(self.config.sources.tail[0], self.config, self.pipeline, self.store)
        tailer._stored = tailer._load_offsets()  # what start() does, without the thread
        return tailer

    def poll(self, times: int = 1) -> None:
        for _ in range(times):
            self.tailer.poll_once()
            self.tailer._drain_inflight()

    def stored(self) -> int:
        with self.store.read() as conn:
            return count_predictions(conn, "model")[0]

    def duplicates(self) -> int:
        return self.pipeline.stats.snapshot()[1].get(("jsonl", "duplicate"), 0)

    def close(self) -> None:
        self.tailer.stop()
        self.pipeline.stop()
        self.store.close()


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.close()


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_partial_last_line_waits_for_its_newline(h: Harness) -> None:
    log = h.logs / "app.log"
    full = line(3)
    append(log, line(1) + line(2) + full[:10])
    h.poll()
    assert h.stored() == 2
    assert h.tailer.status()["files"][0]["offset"] == len(line(1) + line(2))
    append(log, full[10:])
    h.poll()
    assert h.stored() == 3 and h.duplicates() == 0


def test_rotation_by_rename_mid_stream_loses_and_repeats_nothing(h: Harness) -> None:
    log = h.logs / "app.log"
    append(log, b"".join(line(i) for i in range(100)))
    h.poll()
    append(log, b"".join(line(i) for i in range(100, 150)))  # not yet read when rotated
    os.rename(log, h.logs / "app.log.1")
    append(log, b"".join(line(i) for i in range(150, 200)))  # the new file
    append(h.logs / "app.log.1", line(999))  # a late write through the old descriptor
    h.poll(3)
    assert h.stored() == 201 and h.duplicates() == 0


def test_rotated_file_outside_the_glob_is_read_to_its_end(tmp_path: Path) -> None:
    h = Harness(tmp_path, pattern="app.log")
    log = h.logs / "app.log"
    append(log, b"".join(line(i) for i in range(10)))
    h.poll()
    append(log, b"".join(line(i) for i in range(10, 20)))
    os.rename(log, h.logs / "old.log")
    append(log, b"".join(line(i) for i in range(20, 25)))
    h.poll(5)
    assert h.stored() == 25 and h.duplicates() == 0
    assert len(h.tailer.files) == 1  # the rotated-away file was closed after draining
    h.close()


def test_copytruncate_restarts_at_zero(tmp_path: Path) -> None:
    h = Harness(tmp_path, pattern="app.log")
    log = h.logs / "app.log"
    append(log, b"".join(line(i) for i in range(30)))
    h.poll()
    shutil.copy(log, h.logs / "app.log.1")
    with open(log, "r+b") as fh:
        fh.truncate(0)
    append(log, line(30) + line(31))
    h.poll()
    assert h.stored() == 32 and h.duplicates() == 0
    h.close()


def test_truncate_and_rewrite_past_the_offset_is_detected(tmp_path: Path) -> None:
    h = Harness(tmp_path, pattern="app.log")
    log = h.logs / "app.log"
    append(log, line(1) + line(2))
    h.poll()
    log.write_bytes(b"".join(line(f"new{i}") for i in range(10)))  # larger than the old offset
    h.poll()
    assert h.stored() == 12
    h.close()


def test_restart_resumes_from_committed_offsets(h: Harness) -> None:
    log = h.logs / "app.log"
    append(log, b"".join(line(i) for i in range(40)))
    h.poll()
    h.tailer.stop()
    h.tailer = h.new_tailer()  # a restarted serve: offsets come from the store
    append(log, b"".join(line(i) for i in range(40, 45)))
    h.poll()
    assert h.tailer.lines_read == 5  # only the new lines were read again
    assert h.stored() == 45 and h.duplicates() == 0


def test_bad_lines_are_rejected_and_good_ones_kept(h: Harness) -> None:
    append(h.logs / "app.log", line(1) + b"{not json\n" + b'{"id":"x"}\n' + line(2))
    h.poll()
    assert h.stored() == 2
    rejected = h.pipeline.stats.snapshot()[1]
    assert rejected[("jsonl", "malformed_json")] == 1 and rejected[("jsonl", "missing_field")] == 1


def test_symlink_escaping_the_root_is_not_read(h: Harness, tmp_path: Path) -> None:
    secret = tmp_path / "secret.log"
    secret.write_bytes(line("secret"))
    os.symlink(secret, h.logs / "app.log.evil")
    append(h.logs / "app.log", line(1))
    h.poll()
    assert h.stored() == 1
    assert h.pipeline.stats.snapshot()[1][("jsonl", "path_not_allowed")] == 1


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("/etc/*.log", "outside sources.allowed_roots"),
        ("{logs}/../*.log", "'..'"),
        ("relative/*.log", "absolute"),
        ("{logs}/link/*.log", "outside sources.allowed_roots"),  # symlinked directory
    ],
)
def test_glob_outside_roots_is_a_config_error(tmp_path: Path, pattern: str, message: str) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    os.symlink("/etc", logs / "link")
    with pytest.raises(ConfigError, match=message):
        check_glob(pattern.format(logs=logs), [logs])
    with pytest.raises(ConfigError, match="allowed_roots"):
        check_glob(str(logs / "*.log"), [])
    assert check_glob(str(logs / "*" / "x.log"), [logs]) == logs.resolve()


def test_tailer_refuses_a_bad_glob_at_construction(tmp_path: Path) -> None:
    config = build_config(
        {"state_dir": str(tmp_path), "sources": {"allowed_roots": [str(tmp_path / "r")]}}
    )
    with pytest.raises(ConfigError):
        Tailer(TailSourceConfig(glob="/var/log/*.log"), config, None, None)  # type: ignore[arg-type]


def test_mapping_kind_converts_each_line_before_validation(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "groups": {"attributes": ["site"]},
            "sources": {
                "allowed_roots": [str(tmp_path / "logs")],
                "tail": [
                    {
                        "name": "custom",
                        "kind": "mapping",
                        "glob": str(tmp_path / "logs" / "*.log"),
                        "mapping": {"id": "rid", "pred": "out.cls", "groups.site": "meta.site"},
                    }
                ],
            },
        }
    )
    store = Store.open(config.store_path)
    pipeline = IngestPipeline(config, store)
    pipeline.start()
    tailer = Tailer(config.sources.tail[0], config, pipeline, store)
    raw = [{"rid": "a", "out": {"cls": 1}, "meta": {"site": "B"}}, {"rid": "b", "out": {}}]
    (tmp_path / "logs" / "x.log").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in raw))
    tailer.poll_once()
    tailer._drain_inflight()
    with store.read() as conn:
        rows = conn.execute("SELECT id, pred, group_key, source FROM predictions").fetchall()
    assert rows == [("a", 1, "site=B", "custom")]
    assert pipeline.stats.snapshot()[1] == {("custom", "missing_field"): 1}
    tailer.stop()
    pipeline.stop()
    store.close()


def test_bad_mapping_is_a_config_error_at_start(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    source = {"kind": "mapping", "glob": str(tmp_path / "logs" / "*.log"), "mapping": {"nope": "x"}}
    config = build_config(
        {
            "state_dir": str(tmp_path),
            "sources": {"allowed_roots": [str(tmp_path / "logs")], "tail": [source]},
        }
    )
    with pytest.raises(ConfigError):
        Tailer(config.sources.tail[0], config, None, None)  # type: ignore[arg-type]

"""Mined pseudo-groups through a real ``patchd serve``: no group attribute is configured, events
carry embeddings, and ``monitor.mined_groups`` points at a membership file whose class-"a"
direction is known. Events of class "a" on that direction must land in ``mined=member`` cells,
and when (only) their accuracy drops, the monitor must flag the member cell and nothing else.
Events without an embedding, or with one of another width, are left ``unknown`` and counted."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from patchd.monitor.mined import MinedDirection, MinedGroups
from tests.procs import ServeProcess, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = ["a", "b"]
DIM = 4
DESCRIPTION = "a: the failing subgroup looks like 'sticker=yes'"
DETECTION_BOUND = 300  # labeled member events of class a after the change


class Stream:
    """Class "a" members (share 0.2) have embedding coordinate 0 > 0, the rest < 0; 2% of events
    carry no embedding and 2% one of width 3."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.i = 0
        self.sent: list[tuple[int, int, str]] = []  # (label, pred, expected mined value)
        self.skipped = {"no_embedding": 0, "other_width": 0, "class_not_mined": 0}

    def event(self, acc_member: float) -> tuple[dict[str, Any], dict[str, Any]]:
        rng, rid = self.rng, f"r-{self.i}"
        self.i += 1
        y = int(rng.integers(0, 2))
        x = rng.normal(0, 1, DIM)
        member = y == 0 and rng.random() < 0.2
        x[0] = (abs(x[0]) + 0.2) * (1 if member else -1) if y == 0 else x[0]
        kind = rng.random()
        embedding: list[float] | None = [float(v) for v in x]
        mined = "member" if member else ("rest" if y == 0 else "unknown")
        reason = "class_not_mined" if y == 1 else None
        if kind < 0.02:
            embedding, mined, reason = None, "unknown", "no_embedding"
        elif kind < 0.04:
            embedding, mined, reason = [0.1, 0.2, 0.3], "unknown", "other_width"
        if reason is not None:
            self.skipped[reason] += 1
        pred = y if rng.random() < (acc_member if member else 0.92) else 1 - y
        conf = float(rng.uniform(0.6, 0.99))
        pred_event = {
            "id": rid,
            "ts": datetime.now(UTC).isoformat(),
            "pred": pred,
            "probs": [conf, 1 - conf] if pred == 0 else [1 - conf, conf],
            "embedding": embedding,
        }
        self.sent.append((y, pred, mined))
        return pred_event, {"id": rid, "label": y}

    def batch(self, n: int, acc_member: float) -> tuple[list[dict], list[dict]]:
        pairs = [self.event(acc_member) for _ in range(n)]
        return [p for p, _ in pairs], [lab for _, lab in pairs]


def post(client: httpx.Client, preds: list[dict], labels: list[dict]) -> None:
    for path, body in (("/v1/predictions", preds), ("/v1/labels", labels)):
        r = client.post(path, json=body)
        assert r.status_code in (200, 202), r.text
        assert r.json()["rejected"] == [], r.text


def wait_for(client: httpx.Client, n: int, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = client.get("/v1/groups").json()
        if doc["n"] >= n:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"monitor did not reach {n} labeled events: {doc.get('n')}")


def degraded(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["class"], c["group"]) for c in doc["cells"] if c["state"] == "degraded"]


@pytest.fixture
def served(tmp_path: Path, clean_redis: str) -> ServeProcess:
    direction = MinedDirection(0, "a", np.array([5.0, 0, 0, 0]), 0.0, 0.0, 0.9, DESCRIPTION)
    mined = MinedGroups("m", "run-x", "e" * 64, "classifier-features", np.zeros(DIM),
                        np.ones(DIM), (direction,))  # fmt: skip
    path = mined.write(tmp_path / "mined_groups.json")
    overrides = {
        "redis": {"url": clean_redis, "embedded": "never"},
        "model": {"name": "m", "class_names": CLASSES},
        "monitor": {
            "interval_s": 0.2,
            "window": 50_000,
            "reference_window": 1500,
            "cooldown_s": 0,
            "mined_groups": str(path),
        },
        "trigger": {"min_interval_s": 0},
    }
    proc = start_serve(tmp_path, overrides)
    yield proc
    proc.stop()


def test_member_cell_of_a_mined_direction_is_tracked_and_flagged(served: ServeProcess) -> None:
    stream, client = Stream(seed=11), served.client()
    for _ in range(12):  # 3000 stationary events
        post(client, *stream.batch(250, acc_member=0.92))
        doc = wait_for(client, len(stream.sent))
        assert degraded(doc) == [], doc["cells"]
    assert doc["reference"] == "window"
    cells = {(c["class"], c["group"]): c for c in doc["cells"]}
    sent_member = [s for s in stream.sent if s[2] == "member"]
    assert cells[("a", "mined=member")]["n"] == len(sent_member) > 250
    assert cells[("a", "mined=rest")]["n"] == sum(1 for s in stream.sent if s[2] == "rest")
    assert cells[("b", "mined=member")]["n"] == 0  # class b has no direction: never a member

    changed_at, after = len(stream.sent), 0
    while after <= 3 * DETECTION_BOUND:
        post(client, *stream.batch(100, acc_member=0.40))
        after = sum(1 for s in stream.sent[changed_at:] if s[2] == "member")
        doc = wait_for(client, len(stream.sent))
        if degraded(doc):
            break
    flagged = degraded(doc)
    assert flagged, "the member cell's drop was never detected"
    assert {g for _, g in flagged} == {"mined=member"}, flagged
    print(f"mined=member flagged after {after} of its labeled events")
    assert after <= DETECTION_BOUND

    mined = doc["mined_groups"]
    assert mined["active"] and mined["run_id"] == "run-x" and mined["embedding_dim"] == DIM
    assert mined["descriptions"] == [
        "class a, mined failure mode: the failing subgroup looks like 'sticker=yes' "
        "(confidence 0.90)"
    ]
    assert mined["skipped"] == stream.skipped and min(stream.skipped.values()) > 0
    metrics = httpx.get(served.url + "/metrics").text
    cls = flagged[0][0]
    state = (
        f'patchd_alert_state{{class="{cls}",group="mined=member",model="m",state="degraded"}} 1.0'
    )
    assert state in metrics
    assert 'patchd_mined_groups_active{model="m"} 1.0' in metrics
    n = stream.skipped["other_width"]
    assert f'patchd_mined_unknown_events_total{{model="m",reason="other_width"}} {n}.0' in metrics
    _assert_cli_status(served)


def _assert_cli_status(served: ServeProcess) -> None:
    from click.testing import CliRunner

    from patchd.cli import cli

    env = {"PATCHD_CONFIG": str(served.config_path), "PATCHD_TOKEN": served.token}
    table = CliRunner().invoke(cli, ["status"], env=env, terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "mined=member" in table.output and "degraded" in table.output
    assert "class a, mined failure mode:" in table.output and "sticker=yes" in table.output

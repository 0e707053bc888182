"""The monitor through a real ``patchd serve``: a stationary stream, then the minority subgroup's
share grows and its accuracy drops. ``GroupDegraded`` (seen as the ``degraded`` state of
``/v1/groups`` and ``patchd_alert_state``) and the patch trigger must come within a bounded number
of that group's labeled events, and never during the stationary part. Per-cell accuracies are
checked against a direct computation over the events the test sent."""

from __future__ import annotations

import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.procs import ServeProcess, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLASSES = ["a", "b"]
BATCH = 250
DETECTION_BOUND = 400  # labeled events of the affected group after the change


class Stream:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.i = 0
        self.sent: list[tuple[int, int, str]] = []  # (label, pred, group) of every labeled event

    def batch(
        self, n: int, share_b: float, acc: dict[str, float]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # noqa: E501
        preds, labels = [], []
        now = datetime.now(UTC).isoformat()
        for _ in range(n):
            site = "B" if self.rng.random() < share_b else "A"
            y = int(self.rng.integers(0, 2))
            pred = y if self.rng.random() < acc[site] else 1 - y
            conf = float(self.rng.uniform(0.6, 0.99))
            probs = [conf, 1 - conf] if pred == 0 else [1 - conf, conf]
            rid = f"r-{self.i}"
            self.i += 1
            preds.append(
                {"id": rid, "ts": now, "pred": pred, "probs": probs, "groups": {"site": site}}
            )
            labels.append({"id": rid, "label": y})
            self.sent.append((y, pred, f"site={site}"))
        return preds, labels


def post(client: httpx.Client, preds: list[dict[str, Any]], labels: list[dict[str, Any]]) -> None:
    for path, body in (("/v1/predictions", preds), ("/v1/labels", labels)):
        r = client.post(path, json=body)
        assert r.status_code in (200, 202), r.text
        assert r.json()["rejected"] == [], r.text


def wait_for_monitor(client: httpx.Client, n_labeled: int, timeout: float = 30) -> dict[str, Any]:
    """/v1/groups once the monitor's window holds all ``n_labeled`` events."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = client.get("/v1/groups").json()
        if doc["n"] >= n_labeled:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"monitor did not reach {n_labeled} labeled events: {doc}")


def degraded_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["class"], c["group"]) for c in doc["cells"] if c["state"] == "degraded"]


def direct_accuracy(sent: list[tuple[int, int, str]]) -> dict[tuple[str, str], tuple[int, float]]:
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for y, pred, group in sent:
        for key in ((CLASSES[y], group), ("*", group)):
            counts[key][0] += 1
            counts[key][1] += int(pred == y)
    return {k: (n, ok / n) for k, (n, ok) in counts.items()}


@pytest.fixture
def served(tmp_path: Path, clean_redis: str) -> ServeProcess:
    overrides = {
        "redis": {"url": clean_redis, "embedded": "never"},
        "model": {"name": "m", "class_names": CLASSES},
        "groups": {"attributes": ["site"], "values": {"site": ["A", "B"]}},
        "monitor": {
            "interval_s": 0.2,
            "window": 50_000,
            "reference_window": 2000,
            "cooldown_s": 0,
            "drift_window": 2000,
            "drift_interval_s": 1,
        },
        "trigger": {"min_interval_s": 0},
    }
    proc = start_serve(tmp_path, overrides)
    yield proc
    proc.stop()


def test_minority_group_drop_is_detected_and_triggers_a_patch(served: ServeProcess) -> None:
    stream, client = Stream(seed=7), served.client()
    stationary = {"A": 0.92, "B": 0.90}
    for _ in range(24):  # 6000 stationary events, B at 10% of traffic
        post(client, *stream.batch(BATCH, 0.10, stationary))
        doc = wait_for_monitor(client, len(stream.sent))
        assert degraded_rows(doc) == [], f"false alarm in the stationary part: {doc['cells']}"
    assert doc["reference"] == "window"
    assert doc["patch_requests"] == []

    changed_at = len(stream.sent)
    b_after = 0
    while b_after <= 3 * DETECTION_BOUND:
        post(client, *stream.batch(100, 0.40, {"A": 0.92, "B": 0.55}))
        b_after = sum(1 for _, _, g in stream.sent[changed_at:] if g == "site=B")
        doc = wait_for_monitor(client, len(stream.sent))
        if degraded_rows(doc):
            break
    assert degraded_rows(doc), "the drop of site=B was never detected"
    assert all(g == "site=B" for _, g in degraded_rows(doc)), degraded_rows(doc)
    print(f"site=B detected after {b_after} of its labeled events (posted in batches of 100)")
    assert b_after <= DETECTION_BOUND, f"detected only after {b_after} labeled site=B events"

    expected = direct_accuracy(stream.sent)
    for cell in doc["cells"]:
        n, acc = expected.get((cell["class"], cell["group"]), (0, None))
        assert cell["n"] == n
        if n:
            assert cell["accuracy"] == pytest.approx(acc, abs=1e-12)
            assert cell["ci_low"] <= acc <= cell["ci_high"]

    _assert_triggered(served, client)
    for _ in range(8):  # the drift window (2000 newest predictions) now holds only the new mix
        post(client, *stream.batch(BATCH, 0.40, {"A": 0.92, "B": 0.55}))
    _assert_group_mix_drift(client)
    _assert_cli_status(served)
    metrics = httpx.get(served.url + "/metrics").text
    assert 'patchd_alert_state{class="*",group="site=B",model="m",state="degraded"} 1.0' in metrics
    assert 'patchd_group_samples{class="a",group="site=other",model="m"} 0.0' in metrics


def _assert_triggered(served: ServeProcess, client: httpx.Client, timeout: float = 10) -> None:
    """The trigger created a run (runs API) or recorded the request (kv, via /v1/groups)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests = client.get("/v1/groups").json()["patch_requests"]
        if requests:
            assert len(requests) == 1, requests  # one open run/request per model
            assert "site=B" in requests[0]["reason"]
            print("patch request:", requests[0])
            if requests[0]["run_id"]:
                runs = client.get("/v1/runs").json()
                runs = runs.get("runs", runs) if isinstance(runs, dict) else runs
                assert any(r["id"] == requests[0]["run_id"] for r in runs), runs
            return
        time.sleep(0.1)
    raise AssertionError(f"no patch request after degradation:\n{served.log()[-3000:]}")


def _assert_group_mix_drift(client: httpx.Client, timeout: float = 60) -> None:
    """The drift job (evidently) sees site=B's share grow from 10% to 40% (label-free)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        drift = client.get("/v1/groups").json()["drift"]
        mix = [d for d in drift if d["feature"] == "group_mix"]
        if mix and mix[0]["drifted"]:
            assert all(d["label_free"] for d in drift)
            return
        time.sleep(0.5)
    raise AssertionError(f"no group_mix drift: {drift}")


def _assert_cli_status(served: ServeProcess) -> None:
    from click.testing import CliRunner

    from patchd.cli import cli

    env = {"PATCHD_CONFIG": str(served.config_path), "PATCHD_TOKEN": served.token}
    table = CliRunner().invoke(cli, ["status"], env=env, terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "site=B" in table.output and "degraded" in table.output
    as_json = CliRunner().invoke(cli, ["status", "--json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    import json

    doc = json.loads(as_json.output)
    assert doc["status"]["model"] == "m" and doc["groups"]["model"] == "m"


def _wait_states(client: httpx.Client, want_degraded: bool, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = client.get("/v1/groups").json()
        if bool(degraded_rows(doc)) == want_degraded:
            return doc
        time.sleep(0.2)
    raise AssertionError(f"cells never became {'degraded' if want_degraded else 'ok'}: {doc}")


def _with_floor(path: Path, floor: Any) -> None:
    import yaml

    cfg = yaml.safe_load(path.read_text())
    cfg["monitor"]["accuracy_floor"] = floor
    path.write_text(yaml.safe_dump(cfg))


def test_floor_and_reload_by_sighup_and_by_the_admin_route(
    tmp_path: Path, clean_redis: str
) -> None:
    import signal
    import subprocess

    reader = "reader-token-0123456789abcdef"
    (tmp_path / "tokens").write_text(f"{reader} read,approve reader\n")
    (tmp_path / "tokens").chmod(0o600)
    overrides = {
        "redis": {"url": clean_redis, "embedded": "never"},
        "model": {"name": "m", "class_names": CLASSES},
        "groups": {"attributes": ["site"], "values": {"site": ["A", "B"]}},
        "monitor": {"interval_s": 0.2, "window": 50_000, "reference_window": 2000},
        "trigger": {"enabled": False},
        "api": {"token_file": str(tmp_path / "tokens")},
    }
    served = start_serve(tmp_path, overrides)
    stream, client = Stream(seed=11), served.client()
    try:
        for _ in range(8):  # the reference: both sites at 93 %
            post(client, *stream.batch(BATCH, 0.5, {"A": 0.93, "B": 0.93}))
        for _ in range(16):  # 92.8 %: fine against the reference and the default floor 0.6
            post(client, *stream.batch(BATCH, 0.5, {"A": 0.928, "B": 0.928}))
        doc = wait_for_monitor(client, len(stream.sent))
        assert doc["reference"] == "window" and degraded_rows(doc) == []

        _with_floor(served.config_path, 0.97)  # a floor the cells are below: SIGHUP applies it
        served.proc.send_signal(signal.SIGHUP)
        doc = _wait_states(client, want_degraded=True)  # no new events were sent
        assert ("*", "site=A") in degraded_rows(doc)
        assert {c["threshold"] for c in doc["cells"] if c["n"]} == {0.97}
        assert "config reloaded" in served.log() and served.proc.poll() is None

        _with_floor(served.config_path, 2.0)  # invalid: refused, the running floor is kept
        refused = client.post("/v1/config/reload")
        assert refused.status_code == 400 and "accuracy_floor" in refused.text, refused.text
        assert "running one is kept" in refused.text
        assert degraded_rows(client.get("/v1/groups").json())
        assert served.client(reader).post("/v1/config/reload").status_code == 403

        _with_floor(served.config_path, 0.6)  # back: the CLI (the admin route) re-judges
        env = {**served.env, "PATCHD_CONFIG": str(served.config_path)}
        cli = subprocess.run(
            [sys_patchd(), "config", "reload"], env=env, capture_output=True, text=True, timeout=60
        )
        assert cli.returncode == 0, cli.stderr
        assert "applied: monitor.accuracy_floor: 2.0 -> 0.6" not in cli.stdout
        assert "applied: monitor.accuracy_floor: 0.97 -> 0.6" in cli.stdout, cli.stdout
        _wait_states(client, want_degraded=False)
    finally:
        served.stop()


def sys_patchd() -> str:
    from tests.procs import PATCHD

    return PATCHD

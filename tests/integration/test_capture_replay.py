"""Replay >= 10,000 mixed upstream-format events into one real `patchd serve`, every integration
at once: KServe logger CloudEvents (v1/v2, binary and structured mode, default and canary,
transformer and predictor loggers) and Seldon Core v1 graphs (transformer + model) over HTTP,
BentoML monitor files rotated while a real tail source reads them, and TorchServe requests through
TorchServe's own parsing and the handler mixin, sent by a real ``PatchdLogger`` over HTTP. Every
count is checked exactly, per integration: stored, joined, orphaned, duplicates, rejected and
ignored by reason (capture-level rejections in ``patchd_ingest_rejected_total`` too), inputs
dropped by reason, and that a prediction whose input alone is unusable is still stored.
Generators: tests/capture_upstream.py (KServe, Seldon), tests/capture_fixtures/bentoml_torchserve.py
(BentoML, TorchServe)."""

from __future__ import annotations

import http.client
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from patchd.plugins.serving.client import ClientStats, PatchdLogger
from tests import capture_upstream as up
from tests.capture_fixtures import bentoml_torchserve as bt
from tests.procs import ServeProcess, start_serve

pytestmark = pytest.mark.integration
ROUNDS = {"kserve": 420, "seldon": 620}  # rounds per CloudEvents generator
BENTO_ROWS, BENTO_PER_FILE = 1600, 400  # four files: three daily rollovers during the replay
TS_REQUESTS = 800  # TorchServe requests (600 of them logged)
THREADS = 8
TTL_S = 4.0
TAIL = "bento"  # the tail source's name: its events' and metrics' source
ZONE = "Asia/Tokyo"  # the BentoML writer's zone (naive local timestamps)


@dataclass(frozen=True)
class Replayed:
    proc: ServeProcess
    root: Path  # sources.allowed_roots; TorchServe / BentoML input URIs lie under root/images
    logs: Path  # BentoML's monitoring/<name>/data directory


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Replayed]:
    tmp = tmp_path_factory.mktemp("replay")
    logs = tmp / "monitoring" / "skin" / "data"
    logs.mkdir(parents=True)
    tail = {
        "name": TAIL,
        "kind": "bentoml",
        "glob": str(logs / "data.*.log*"),  # the live file and the rotated data.0.log.<day>
        "timezone": ZONE,
        "poll_interval_s": 0.1,
    }
    sources = {
        "kserve": {"ttl_s": TTL_S},
        "seldon": {"ttl_s": TTL_S, "node": "skin"},  # explicit: the graph's model node
        "tail": [tail],
    }
    proc = start_serve(tmp, up.serve_overrides(redis_url, [tmp], **sources))
    yield Replayed(proc, tmp, logs)
    proc.stop()


def post_all(served: ServeProcess, units: list[list[up.Post]]) -> Counter[int]:
    """Post every unit (its events in order) from THREADS keep-alive connections."""
    parts = urlsplit(served.url)
    todo: queue.SimpleQueue[list[up.Post]] = queue.SimpleQueue()
    for unit in units:
        todo.put(unit)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    auth = {"Authorization": f"Bearer {served.token}"}

    def worker() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        seen: Counter[int] = Counter()
        try:
            while True:
                try:
                    unit = todo.get_nowait()
                except queue.Empty:
                    break
                for path, headers, body in unit:
                    conn.request("POST", path, body=body, headers={**headers, **auth})
                    resp = conn.getresponse()
                    resp.read()
                    seen[resp.status] += 1
        finally:
            conn.close()
            with lock:
                statuses.update(seen)

    pool = [threading.Thread(target=worker) for _ in range(THREADS)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return statuses


def scrape(served: ServeProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for line in httpx.get(served.url + "/metrics").text.splitlines():
        if not line.startswith("patchd_") or "{" not in line:
            continue
        name, rest = line.split("{", 1)
        labels, value = rest.rsplit("} ", 1)
        pairs = frozenset(
            (k, v.strip('"')) for k, v in (p.split("=", 1) for p in labels.split(",") if p)
        )
        out[(name, pairs)] = float(value)
    return out


def counts(
    metrics: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, *keys: str
) -> Counter[tuple[str, ...]]:
    """A metric's non-zero samples keyed by the values of ``keys`` (in that order)."""
    found: Counter[tuple[str, ...]] = Counter()
    for (metric, labels), value in metrics.items():
        if metric == name and value:
            d = dict(labels)
            found[tuple(d[k] for k in keys)] += int(value)
    return found


def store_counts(served: ServeProcess) -> dict[str, Counter[object]]:
    conn = sqlite3.connect(f"file:{served.state_dir / 'patchd.db'}?mode=ro", uri=True)
    try:
        q = conn.execute
        stored = Counter(dict(q("SELECT source, COUNT(*) FROM predictions GROUP BY source")))
        with_input = Counter(
            dict(
                q(
                    "SELECT source, COUNT(*) FROM predictions WHERE input_uri IS NOT NULL "
                    "GROUP BY source"
                )
            )
        )
        groups: Counter[object] = Counter()
        for attr in ("site", "endpoint"):
            sql = (
                f"SELECT source, json_extract(groups, '$.{attr}') v, COUNT(*) FROM predictions "
                "GROUP BY source, v"
            )
            for source, value, n in q(sql):
                if value != "unknown":
                    groups[(source, attr, value)] = n
    finally:
        conn.close()
    return {"stored": stored, "with_input": with_input, "groups": groups}


def stored_rows(served: ServeProcess, source: str) -> dict[str, tuple[float, bool]]:
    """id -> (ts, has an input) of one source's stored predictions."""
    conn = sqlite3.connect(f"file:{served.state_dir / 'patchd.db'}?mode=ro", uri=True)
    try:
        found = conn.execute(
            "SELECT id, ts, input_uri IS NOT NULL FROM predictions WHERE source = ?", (source,)
        )
        return {i: (ts, bool(has)) for i, ts, has in found}
    finally:
        conn.close()


def settled(served: ServeProcess, expected: up.Expected) -> bool:
    metrics = scrape(served)
    pending = counts(metrics, "patchd_capture_pending", "source")
    stored = store_counts(served)["stored"]
    return not pending and stored == expected.stored


def torchserve_replay(
    served: ServeProcess, traffic: bt.TorchServeTraffic
) -> tuple[bt.HandlerRun, ClientStats]:
    """The handler mixin logs each batch; a real PatchdLogger POSTs the events to serve."""
    logger = PatchdLogger(served.url, token=served.token, batch_size=100, timeout_s=30.0)
    try:
        run = bt.handler_events(traffic.batches, logger=logger)
        assert logger.flush(60), "the TorchServe events were not all sent within 60 s"
        return run, logger.stats()
    finally:
        logger.close(5.0)


def test_replay_of_mixed_upstream_events_gives_exact_counts(served: Replayed) -> None:
    serve = served.proc
    plan = up.replay(ROUNDS, "r")
    ex = plan.expected  # the CloudEvents part: KServe and Seldon
    capture_stored = Counter(ex.stored)
    images = str(served.root / "images")
    bento = bt.bentoml_monitor(
        BENTO_ROWS, images_root=images, zone=ZONE, rows_per_file=BENTO_PER_FILE,
        class_names=up.CLASS_NAMES,
    )  # fmt: skip
    traffic = bt.torchserve_batches(TS_REQUESTS, images_root=images, class_names=up.CLASS_NAMES)
    bx, tx = bento.expected, traffic.expected
    ts_logged = TS_REQUESTS - tx.not_logged
    total = ex.events + BENTO_ROWS + ts_logged
    assert total >= 10_000 and len(bento.files) == BENTO_ROWS // BENTO_PER_FILE
    ex.stored.update({TAIL: bx.stored, "http": tx.stored})
    ex.with_input.update({TAIL: bx.inputs_kept, "http": tx.inputs_kept})

    # one replay: the three feeds at the same time
    t0 = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        files = pool.submit(bt.rotate_bentoml, served.logs, bento, pause_s=0.1)
        handler = pool.submit(torchserve_replay, serve, traffic)
        statuses = post_all(serve, plan.units)
        files.result()
        run, client = handler.result()
    posted_s = time.monotonic() - t0
    rejected_events = sum(ex.rejected.values())
    assert statuses == Counter({200: ex.events - rejected_events, 400: rejected_events})
    deadline = time.monotonic() + TTL_S + 20  # orphans expire after the TTL (periodic sweep)
    while not settled(serve, ex) and time.monotonic() < deadline:
        time.sleep(0.25)

    metrics = scrape(serve)
    db = store_counts(serve)
    assert db["stored"] == ex.stored
    assert db["with_input"] == ex.with_input
    # groups: KServe/Seldon exactly per value; BentoML and TorchServe rows all carry their site
    assert {k: n for k, n in db["groups"].items() if k[0] in capture_stored} == ex.groups
    for source, n in ((TAIL, bx.stored), ("http", tx.stored)):
        sites = {k[2]: v for k, v in db["groups"].items() if k[:2] == (source, "site")}
        assert set(sites) == set(bt.SITES) and sum(sites.values()) == n, (source, sites)

    # the CloudEvents adapters: joins, duplicates, orphans, rejections, ignored, drops
    assert counts(metrics, "patchd_capture_joined_total", "source") == {
        (s,): n for s, n in ex.joined.items()
    }
    assert counts(metrics, "patchd_capture_duplicates_total", "source") == {
        (s,): n for s, n in ex.duplicates.items()
    }
    assert counts(metrics, "patchd_capture_orphans_total", "source", "half") == ex.orphans
    assert counts(metrics, "patchd_capture_rejected_total", "source", "reason") == ex.rejected
    assert counts(metrics, "patchd_capture_ignored_total", "source", "reason") == ex.ignored
    # received (the rejection alert's denominator): the monitored streams' events, all but the
    # ignored ones and those refused before their type was read (a body that is not gzip)
    received = sum(counts(metrics, "patchd_capture_events_total", "source", "type").values())
    unread = sum(n for (_, reason), n in ex.rejected.items() if reason == "bad_gzip")
    assert received == ex.events - sum(ex.ignored.values()) - unread
    assert counts(metrics, "patchd_capture_inputs_dropped_total", "source", "reason") == ex.dropped
    # every prediction the adapters handed to ingest was accepted: none rejected, none a duplicate
    submitted = counts(metrics, "patchd_capture_submitted_total", "source", "result")
    assert submitted == {(s, "accepted"): n for s, n in capture_stored.items()}

    # ingest's rejections, exactly: every capture-level rejection once (same source and
    # reason), and the BentoML rows and TorchServe events that ingest itself refused
    want_rejected = Counter(ex.rejected)
    want_rejected.update({(TAIL, r): n for r, n in bx.rejected.items()})
    want_rejected.update({("http", r): n for r, n in tx.rejected.items()})
    assert counts(metrics, "patchd_ingest_rejected_total", "source", "reason") == want_rejected
    assert counts(metrics, "patchd_ingest_inputs_dropped_total", "source", "reason") == {
        (TAIL, r): n for r, n in bx.inputs_dropped.items()
    }

    # BentoML: every usable row of every rotated file stored once, at its UTC instant
    rows = stored_rows(serve, TAIL)
    assert set(rows) == set(bx.ts)
    assert all(abs(rows[i][0] - t) < 1e-3 for i, t in bx.ts.items())
    # TorchServe: what the mixin logged, what it kept back, what the sender saw
    assert len(run.events) == ts_logged and run.inputs_dropped == tx.inputs_dropped
    assert (client.dropped_full, client.dropped_failed, client.retries) == (0, 0, 0)
    assert client.rejected == sum(tx.rejected.values())

    # no prediction lost when only its input was unusable: the rows without an input hold at
    # least every prediction whose input was dropped (stored == every prediction sent)
    dropped = Counter({s: n for (s, _), n in ex.dropped.items()})
    dropped.update(
        {TAIL: sum(bx.inputs_dropped.values()), "http": sum(run.inputs_dropped.values())}
    )
    for source, n in ex.stored.items():
        assert n - ex.with_input[source] >= dropped[source], source
    print(  # noqa: T201
        f"replayed {total} events ({ex.events} CloudEvents, {BENTO_ROWS} BentoML rows, "
        f"{ts_logged} TorchServe events) in {posted_s:.1f} s ({total / posted_s:.0f}/s)"
    )

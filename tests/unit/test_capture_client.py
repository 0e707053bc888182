"""PatchdLogger against a small stdlib HTTP server: batching, drops, retries, refusals."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from patchd.plugins.serving.client import PatchdLogger


class Sink:
    """Records NDJSON batches; ``status`` decides the answer."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[dict]]] = []
        self.status = 200
        self.auth: list[str | None] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                sink.auth.append(self.headers.get("Authorization"))
                status = sink.status
                if status == 413 and body.count(b"\n") == 0:
                    status = 200  # one record fits
                if status == 200:
                    sink.batches.append((self.path, [json.loads(x) for x in body.split(b"\n")]))
                out = json.dumps({"accepted": 0, "rejected": []}).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, path: str = "/v1/predictions") -> list[dict]:
        return [e for p, batch in self.batches if p == path for e in batch]


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.server.shutdown()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_batches_predictions_and_labels_with_the_token(sink: Sink) -> None:
    logger = PatchdLogger(sink.url, token="tok", batch_size=50, flush_interval_s=0.05)
    for i in range(120):
        assert logger.log({"id": f"r{i}", "pred": i % 2})
    logger.label("r1", 0)
    assert logger.flush(5)
    logger.close()
    assert [e["id"] for e in sink.events()] == [f"r{i}" for i in range(120)]
    assert sink.events("/v1/labels") == [{"id": "r1", "label": 0}]
    assert max(len(b) for _, b in sink.batches) <= 50 and set(sink.auth) == {"Bearer tok"}
    st = logger.stats()
    assert (st.sent, st.dropped_full, st.dropped_failed, st.pending) == (121, 0, 0, 0)


def test_down_patchd_drops_when_full_then_delivers_the_backlog(sink: Sink) -> None:
    port = closed_port()
    logger = PatchdLogger(
        f"http://127.0.0.1:{port}",
        max_queue=100,
        batch_size=10,
        flush_interval_s=0.01,
        backoff_s=0.01,
        max_backoff_s=0.05,
        timeout_s=1,
    )
    started = time.perf_counter()
    results = [logger.log({"id": f"r{i}", "pred": 0}) for i in range(500)]
    assert time.perf_counter() - started < 0.5  # never blocks while patchd is down
    time.sleep(0.2)
    st = logger.stats()
    assert st.retries > 0 and st.sent == 0
    # held: the batch being retried (<= 10) + the queue (100); the rest were dropped and counted
    assert results.count(True) == 500 - st.dropped_full and st.dropped_full >= 390
    assert st.pending == 500 - st.dropped_full
    logger._host, logger._port = "127.0.0.1", sink.server.server_address[1]  # patchd is back
    assert logger.flush(5)
    logger.close()
    assert len(sink.events()) == 500 - st.dropped_full  # the backlog was retried, not lost
    assert logger.stats().sent == 500 - st.dropped_full


def test_5xx_is_retried_and_4xx_dropped_and_413_split(sink: Sink) -> None:
    logger = PatchdLogger(
        sink.url, batch_size=8, flush_interval_s=0.01, backoff_s=0.01, max_backoff_s=0.02
    )
    sink.status = 503
    logger.log({"id": "a", "pred": 0})
    time.sleep(0.1)
    sink.status = 200
    assert logger.flush(5) and [e["id"] for e in sink.events()] == ["a"]
    assert logger.stats().retries >= 1
    sink.status = 401
    logger.log({"id": "b", "pred": 0})
    assert logger.flush(5) and logger.stats().dropped_failed == 1
    sink.status = 413
    for i in range(4):
        logger.log({"id": f"s{i}", "pred": 0})
    assert logger.flush(5)
    logger.close()
    assert [e["id"] for e in sink.events()][1:] == ["s0", "s1", "s2", "s3"]


def test_lazy_events_and_bad_values_never_raise(sink: Sink) -> None:
    logger = PatchdLogger(sink.url, flush_interval_s=0.01)
    assert logger.log_lazy(lambda: [{"id": "x0", "pred": 1}, {"id": "x1", "pred": 0}])
    assert logger.log_lazy(lambda: 1 / 0)  # a broken extractor: counted, thread survives
    assert logger.log({"id": "nan", "pred": 0, "probs": [float("nan")]})  # not JSON-encodable
    assert logger.log_lazy(lambda: None)
    assert logger.log({"id": "y", "pred": 1})
    assert logger.flush(5)
    logger.close()
    assert [e["id"] for e in sink.events()] == ["x0", "x1", "y"]
    assert logger.stats().dropped_failed == 2


def test_bad_url_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="http"):
        PatchdLogger("ftp://x")

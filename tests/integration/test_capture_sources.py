"""Replay real-format logger payloads through a running `patchd serve` and read the store."""

from __future__ import annotations

import json
import sqlite3
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import capture_payloads as cp
from tests.procs import ServeProcess, start_serve

pytestmark = pytest.mark.integration


def _serve(tmp: Path, redis_url: str) -> ServeProcess:
    images = tmp / "images"
    images.mkdir()
    (images / "a.png").write_bytes(cp.PNG)
    logs = tmp / "bento" / "monitoring" / "skin" / "data"
    logs.mkdir(parents=True)
    sources: dict[str, Any] = {
        "allowed_roots": [str(images), str(tmp / "bento")],
        "kserve": {"ttl_s": 1.0},
        "seldon": {"ttl_s": 1.0},
        "tail": [
            {
                "name": "bento",
                "kind": "bentoml",
                "glob": str(logs / "data.*.log*"),
                "timezone": "UTC",  # the fixture's naive times; the default is this machine's
                "poll_interval_s": 0.1,
            }
        ],
    }
    overrides = {
        "redis": {"url": redis_url, "embedded": "never"},
        "model": {"name": "skin", "class_names": ["benign", "malignant"]},
        "groups": {"attributes": ["site"]},
        "sources": sources,
    }
    proc = start_serve(tmp, overrides)
    proc.extra = {"images": images, "logs": logs}  # type: ignore[attr-defined]
    return proc


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServeProcess]:
    proc = _serve(tmp_path_factory.mktemp("capture"), redis_url)
    yield proc
    proc.stop()


def rows(
    served: ServeProcess, where: str = "1=1", args: tuple[Any, ...] = ()
) -> dict[str, dict[str, Any]]:
    """Read the store read-only (serve is the only writer)."""
    db = served.state_dir / "patchd.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute(f"SELECT * FROM predictions WHERE {where}", args).fetchall()
    finally:
        conn.close()
    out = {}
    for r in found:
        d = dict(r)
        d["probs"] = list(array("f", d["probs"])) if d["probs"] else None
        d["groups"] = json.loads(d["groups"])
        out[d["id"]] = d
    return out


def post(client: httpx.Client, path: str, headers: dict[str, str], body: bytes) -> httpx.Response:
    return client.post(path, headers=headers, content=body)


def metric(served: ServeProcess, name: str, labels: str) -> float:
    text = httpx.get(served.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in labels.split(",")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_kserve_v1_batch_joins_into_one_event_per_instance(served: ServeProcess) -> None:
    meta = {"X-Patchd-Group-Site": ["B"]}
    with served.client() as c:
        r1 = post(
            c,
            "/v1/sources/kserve",
            cp.kserve_headers("k1", "request", metadata=meta),
            cp.v1_request(2),
        )
        r2 = post(
            c,
            "/v1/sources/kserve",
            cp.kserve_headers("k1", "response", metadata=meta),
            cp.v1_response([[0.2, 0.8], [0.9, 0.1]]),
        )
    assert (r1.status_code, r1.json()["status"]) == (200, "buffered")
    assert r2.status_code == 200 and r2.json() == {
        "status": "joined",
        "accepted": 2,
        "duplicates": 0,
        "rejected": [],
    }
    got = rows(served, "id LIKE 'k1%'")
    assert sorted(got) == ["k1-0", "k1-1"]
    assert got["k1-0"]["pred"] == 1 and got["k1-1"]["pred"] == 0
    assert got["k1-0"]["probs"] == pytest.approx([0.2, 0.8], abs=1e-6)
    assert got["k1-0"]["groups"] == {"site": "B"} and got["k1-0"]["model"] == "skin"
    assert got["k1-0"]["source"] == "kserve"
    assert got["k1-0"]["ts"] == pytest.approx(1795428000.0)  # ce-time of the request


def test_kserve_v2_out_of_order_halves_and_duplicates(served: ServeProcess) -> None:
    before = metric(served, "patchd_capture_duplicates_total", 'source="kserve"')
    with served.client() as c:
        resp_h = cp.kserve_headers("k2", "response")
        req_h = cp.kserve_headers("k2", "request")
        first = post(c, "/v1/sources/kserve", resp_h, cp.v2_response([[0.3, 0.7]]))
        dup_resp = post(c, "/v1/sources/kserve", resp_h, cp.v2_response([[0.3, 0.7]]))
        joined = post(c, "/v1/sources/kserve", req_h, cp.v2_request_json(1))
        dup_req = post(c, "/v1/sources/kserve", req_h, cp.v2_request_json(1))
    assert [r.json()["status"] for r in (first, dup_resp, joined, dup_req)] == [
        "buffered",
        "duplicate",
        "joined",
        "duplicate",
    ]
    got = rows(served, "id LIKE 'k2%'")
    assert list(got) == ["k2"]  # one instance: the event id is the ce-id itself
    assert got["k2"]["model_version"] == "7" and got["k2"]["pred"] == 1
    assert got["k2"]["groups"] == {"site": "unknown"}
    assert metric(served, "patchd_capture_duplicates_total", 'source="kserve"') == before + 2


def test_kserve_v2_binary_extension_stores_the_inline_image(served: ServeProcess) -> None:
    req, req_len = cp.binary_request([cp.PNG, cp.PNG])
    resp, resp_len = cp.binary_response([[0.6, 0.4], [0.1, 0.9]])
    with served.client() as c:
        a = post(
            c,
            "/v1/sources/kserve",
            {
                **cp.kserve_headers("k3", "request", content_type="application/octet-stream"),
                "ce-inferenceheadercontentlength": str(req_len),
            },
            req,
        )
        # KServe's agent does not forward Inference-Header-Content-Length: found by JSON end
        b = post(
            c,
            "/v1/sources/kserve",
            cp.kserve_headers("k3", "response", content_type="application/octet-stream"),
            resp,
        )
    assert a.status_code == 200 and b.json()["accepted"] == 2, b.text
    got = rows(served, "id LIKE 'k3-%'")
    assert [got[k]["pred"] for k in ("k3-0", "k3-1")] == [0, 1]
    assert got["k3-1"]["probs"] == pytest.approx([0.1, 0.9], abs=1e-6)
    assert got["k3-0"]["model_version"] == "3"
    stored = Path(got["k3-0"]["input_uri"].removeprefix("file://"))
    assert stored.read_bytes() == cp.PNG and stored.parent.name == "inputs"


def test_kserve_malformed_bodies_are_rejected_with_a_reason(served: ServeProcess) -> None:
    resp, n = cp.binary_response([[0.6, 0.4]])
    cases = [
        (cp.kserve_headers("bad1", "response"), b"{not json", "bad_json"),
        (cp.kserve_headers("bad2", "response"), resp[:-3], "binary_truncated"),
        (cp.kserve_headers("bad3", "response"), b'{"predictions": [{"x": 1}]}', "no_prediction"),
        (
            {**cp.kserve_headers("bad4", "response"), "ce-type": "com.example.other"},
            b"{}",
            "unknown_type",
        ),
        ({"content-type": "application/json"}, b"{}", "bad_cloudevent"),
    ]
    with served.client() as c:
        for headers, body, reason in cases:
            r = post(c, "/v1/sources/kserve", headers, body)
            assert (r.status_code, r.json()["reason"]) == (400, reason), r.text
        assert (
            post(c, "/v1/sources/kserve", cp.kserve_headers("bad5", "response"), b"{}").status_code
            == 400
        )
    assert rows(served, "id LIKE 'bad%'") == {}
    assert metric(served, "patchd_capture_rejected_total", 'reason="bad_json"') == 1


def test_kserve_orphans_expire_after_the_ttl(served: ServeProcess) -> None:
    before_req = metric(served, "patchd_capture_orphans_total", 'source="kserve",half="request"')
    before_resp = metric(served, "patchd_capture_orphans_total", 'source="kserve",half="response"')
    meta = {"X-Patchd-Group-Site": ["C"]}
    with served.client() as c:
        post(c, "/v1/sources/kserve", cp.kserve_headers("o-req", "request"), cp.v1_request(1))
        post(
            c,
            "/v1/sources/kserve",
            cp.kserve_headers("o-resp", "response", metadata=meta),
            cp.v1_response([[0.4, 0.6]]),
        )
    # a response whose request never came still counts (no input); a lone request is dropped
    got = wait_for(lambda: rows(served, "id LIKE 'o-%'"), timeout=10)
    assert list(got) == ["o-resp"] and got["o-resp"]["groups"] == {"site": "C"}
    assert got["o-resp"]["input_uri"] is None
    assert wait_for(
        lambda: (
            metric(served, "patchd_capture_orphans_total", 'source="kserve",half="request"')
            == before_req + 1
        )
    )
    assert (
        metric(served, "patchd_capture_orphans_total", 'source="kserve",half="response"')
        == before_resp + 1
    )


def test_kserve_requires_an_ingest_token(served: ServeProcess) -> None:
    r = httpx.post(
        served.url + "/v1/sources/kserve",
        headers=cp.kserve_headers("t", "request"),
        content=cp.v1_request(1),
    )
    assert r.status_code == 401
    # loggers cannot add headers: the token may ride in the logger URL instead
    r = httpx.post(
        served.url + f"/v1/sources/kserve?token={served.token}",
        headers=cp.kserve_headers("t", "request"),
        content=cp.v1_request(1),
    )
    assert r.status_code == 200
    r = httpx.post(
        served.url + "/v1/sources/seldon?token=wrong-token-0123456789",
        headers=cp.seldon_headers("e", "t", "request"),
        content=cp.seldon_request(1, "A"),
    )
    assert r.status_code == 401


def test_seldon_gzip_events_join_by_request_id(served: ServeProcess) -> None:
    with served.client() as c:
        a = post(
            c,
            "/v1/sources/seldon",
            cp.seldon_headers("e1", "s1", "request"),
            cp.seldon_request(2, "A"),
        )
        b = post(
            c,
            "/v1/sources/seldon",
            cp.seldon_headers("e2", "s1", "response", gzip_body=True),
            cp.seldon_response([[0.7, 0.3], [0.2, 0.8]], "A", gz=True),
        )
        # gzip body without Content-Encoding (Triton behind Seldon): recognised by its magic
        c1 = post(
            c,
            "/v1/sources/seldon",
            cp.seldon_headers("e3", "s2", "response"),
            cp.seldon_response([[0.45, 0.55]], "B", gz=True),
        )
        c2 = post(
            c,
            "/v1/sources/seldon",
            cp.seldon_headers("e4", "s2", "request"),
            cp.seldon_request(1, "B"),
        )
        bad = post(
            c,
            "/v1/sources/seldon",
            cp.seldon_headers("e5", "s3", "response", gzip_body=True),
            b"nope",
        )
    assert a.json()["status"] == "buffered" and b.json()["accepted"] == 2, b.text
    assert c1.json()["status"] == "buffered" and c2.json()["accepted"] == 1
    assert (bad.status_code, bad.json()["reason"]) == (400, "bad_gzip")
    got = rows(served, "source = 'seldon'")
    assert sorted(got) == ["s1-0", "s1-1", "s2"]
    assert [got[k]["pred"] for k in ("s1-0", "s1-1", "s2")] == [0, 1, 1]
    assert got["s1-1"]["groups"] == {"site": "A"} and got["s2"]["groups"] == {"site": "B"}
    assert got["s1-0"]["model_version"] == "skin:1.2"


def test_bentoml_jsonl_through_the_tail_source(served: ServeProcess) -> None:
    logs: Path = served.extra["logs"]  # type: ignore[attr-defined]
    uri = (served.extra["images"] / "a.png").as_uri()  # type: ignore[attr-defined]
    lines = [
        cp.bentoml_line(9001, 1, [0.1, 0.9], "A", uri),
        cp.bentoml_line(9002, 0, [0.8, 0.2], "B", None),
    ]
    (logs / "data.1.log").write_text("\n".join(lines) + "\n")
    got = wait_for(lambda: rows(served, "source = 'bento'"), timeout=15)
    assert sorted(got) == ["9001", "9002"]
    assert got["9001"]["pred"] == 1 and got["9001"]["input_uri"] == uri
    assert got["9001"]["groups"] == {"site": "A"} and got["9002"]["groups"] == {"site": "B"}
    assert got["9002"]["probs"] == pytest.approx([0.8, 0.2], abs=1e-6)
    assert got["9001"]["ts"] == pytest.approx(1795428000.123456, abs=1e-3)

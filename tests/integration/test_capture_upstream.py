"""KServe and Seldon logger events as upstream sends them (official CloudEvents SDK, binary and
structured mode, KServe's own sample bodies) posted over HTTP to a real `patchd serve`."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import capture_payloads as cp
from tests import capture_upstream as up
from tests.procs import ServeProcess, start_serve

pytestmark = pytest.mark.integration
KSERVE, SELDON = "/v1/sources/kserve", "/v1/sources/seldon"
MODES = [pytest.param(False, id="binary"), pytest.param(True, id="structured")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("upstream")
    sources = {"kserve": {"ttl_s": 1.0}, "seldon": {"ttl_s": 1.0}}
    proc = start_serve(tmp, up.serve_overrides(redis_url, [tmp], **sources))
    yield proc
    proc.stop()


def rows(served: ServeProcess, prefix: str) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(f"file:{served.state_dir / 'patchd.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute("SELECT * FROM predictions WHERE id LIKE ?", (prefix + "%",))
        out = {r["id"]: dict(r) for r in found.fetchall()}
    finally:
        conn.close()
    for r in out.values():
        r["groups"] = json.loads(r["groups"])
    return out


def metric(served: ServeProcess, name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in httpx.get(served.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def send(served: ServeProcess, path: str, *events: tuple[dict[str, str], bytes]) -> list[Any]:
    with served.client() as c:
        answers = [c.post(path, headers=h, content=b) for h, b in events]
    return answers


def stored_input(row: dict[str, Any]) -> bytes:
    return Path(row["input_uri"].removeprefix("file://")).read_bytes()


@pytest.mark.parametrize("structured", MODES)
def test_kserve_mnist_sample_with_leading_newline_joins(
    served: ServeProcess, structured: bool
) -> None:
    body = up.sample("mnist.json")
    assert body.startswith(b"\n")  # KServe's sample, sent verbatim by the agent
    k = f"mn-{structured}"
    answers = send(
        served,
        KSERVE,
        up.kserve_event(k, "request", body, structured=structured),
        up.kserve_event(k, "response", up.v1_prediction_body([7]), structured=structured),
    )
    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    assert answers[1].json()["accepted"] == 1
    got = rows(served, k)
    assert got[k]["pred"] == 7
    png = base64.b64decode(json.loads(body)["instances"][0]["data"])
    assert stored_input(got[k]) == png


def test_kserve_whitespace_binary_tail_is_read_as_a_label(served: ServeProcess) -> None:
    before = metric(served, "patchd_capture_rejected_total", source="kserve")
    octet = {"content_type": "application/octet-stream"}
    for label in (9, 10, 11, 12, 13, 32):
        k = f"ws-{label}"
        answers = send(
            served,
            KSERVE,
            up.kserve_event(k, "request", up.v2_rows_request(1)),
            up.kserve_event(k, "response", up.uint8_label_response([label]), **octet),
        )
        assert [a.status_code for a in answers] == [200, 200], answers[1].text
        assert rows(served, k)[k]["pred"] == label
    assert metric(served, "patchd_capture_rejected_total", source="kserve") == before


@pytest.mark.parametrize("structured", MODES)
def test_kserve_b64_instance_forms_are_read(served: ServeProcess, structured: bool) -> None:
    tf = up.sample("tensorflow_input.json")  # {"image_bytes": {"b64": <JPEG>}, "key": ...}
    v2 = up.sample("mnist_v2_bytes.json")  # BYTES input: one base64 string, "shape": -1
    k = f"b64-{structured}"
    for suffix, body in (("tf", tf), ("v2", v2)):
        answers = send(
            served,
            KSERVE,
            up.kserve_event(k + suffix, "request", body, structured=structured),
            up.kserve_event(
                k + suffix, "response", up.v1_prediction_body([1]), structured=structured
            ),
        )
        assert answers[1].json()["accepted"] == 1, answers[1].text
    got = rows(served, k)
    jpeg = base64.b64decode(json.loads(tf)["instances"][0]["image_bytes"]["b64"])
    assert stored_input(got[k + "tf"]) == jpeg
    png = base64.b64decode(json.loads(v2)["inputs"][0]["data"])
    assert stored_input(got[k + "v2"]) == png


def test_kserve_unusable_inputs_are_dropped_counted_and_the_prediction_kept(
    served: ServeProcess,
) -> None:
    def dropped(reason: str) -> float:
        return metric(served, "patchd_capture_inputs_dropped_total", source="kserve", reason=reason)

    before = {r: dropped(r) for r in ("not_base64", "not_image", "no_image")}
    items = [
        {"image_bytes": {"b64": "%%% not base64"}},
        {"data": base64.b64encode(b"plain text, no image").decode()},
        [6.8, 2.8, 4.8, 1.4],
    ]
    answers = send(
        served,
        KSERVE,
        up.kserve_event("drop", "request", up.instances_body(items)),
        up.kserve_event("drop", "response", up.v1_prediction_body([1, 2, 3])),
    )
    assert answers[1].json()["accepted"] == 3, answers[1].text
    got = rows(served, "drop-")
    assert [got[f"drop-{i}"]["pred"] for i in range(3)] == [1, 2, 3]
    assert all(r["input_uri"] is None for r in got.values())
    assert {r: dropped(r) - before[r] for r in before} == {
        "not_base64": 1,
        "not_image": 1,
        "no_image": 1,
    }


def test_kserve_metadata_under_go_canonical_names_gives_groups(served: ServeProcess) -> None:
    meta = {"X-Patchd-Group-Site": ["B", "C"], "Content-Type": ["application/json"]}
    send(
        served,
        KSERVE,
        up.kserve_event("meta", "request", up.v2_rows_request(1), metadata=meta),
        up.kserve_event("meta", "response", up.v2_probs_body([4]), metadata=meta),
    )
    assert rows(served, "meta")["meta"]["groups"] == {"site": "B", "endpoint": "default"}


def test_kserve_streams_stay_apart_by_component_and_endpoint(served: ServeProcess) -> None:
    before = metric(served, "patchd_capture_ignored_total", reason="other_component")
    # a transformer and the predictor log the same ce-id, halves interleaved
    answers = send(
        served,
        KSERVE,
        up.kserve_event("st", "request", up.sample("mnist.json"), component="transformer"),
        up.kserve_event("st", "request", up.v2_rows_request(1)),
        up.kserve_event("st", "response", up.v2_probs_body([2]), component="transformer"),
        up.kserve_event("st", "response", up.v2_probs_body([5])),
        up.kserve_event("cn", "request", up.v2_rows_request(1), endpoint="canary"),
        up.kserve_event("cn", "response", up.v2_probs_body([6]), endpoint="canary"),
    )
    assert [a.json()["status"] for a in answers] == [
        "ignored",
        "buffered",
        "ignored",
        "joined",
        "buffered",
        "joined",
    ]
    got = rows(served, "st") | rows(served, "cn")
    assert got["st"]["pred"] == 5 and got["st"]["groups"]["endpoint"] == "default"
    assert got["cn"]["pred"] == 6 and got["cn"]["groups"]["endpoint"] == "canary"
    assert metric(served, "patchd_capture_ignored_total", reason="other_component") == before + 2


@pytest.mark.parametrize("structured", MODES)
def test_seldon_transformer_and_model_loggers_store_the_model_output(
    served: ServeProcess, structured: bool
) -> None:
    if not structured:  # the model node (named like the model) has logged once since start
        send(served, SELDON, *up.seldon_graph("warm", [0]))
    rid = f"graph-{structured}"
    answers = send(served, SELDON, *up.seldon_graph(rid, [3, 8], structured=structured))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    statuses = [a.json()["status"] for a in answers]
    assert statuses == ["ignored", "ignored", "ignored", "buffered", "joined", "ignored"]
    got = rows(served, rid)
    assert [got[f"{rid}-{i}"]["pred"] for i in (0, 1)] == [3, 8]
    assert got[f"{rid}-0"]["groups"] == {"site": "A", "endpoint": "default"}
    assert got[f"{rid}-0"]["model_version"] == "skin:1.2"


def test_seldon_feedback_is_answered_200_and_ignored(served: ServeProcess) -> None:
    before = metric(served, "patchd_capture_ignored_total", source="seldon", reason="event_type")
    fb = json.dumps({"request": {}, "response": {}, "reward": 1}).encode()
    (answer,) = send(served, SELDON, up.seldon_event("fb", "feedback", fb))
    assert (answer.status_code, answer.json()["status"]) == (200, "ignored")
    after = metric(served, "patchd_capture_ignored_total", source="seldon", reason="event_type")
    assert after == before + 1


def test_seldon_gzip_model_response_in_structured_mode(served: ServeProcess) -> None:
    import gzip

    body = gzip.compress(up.seldon_probs([11]))
    answers = send(
        served,
        SELDON,
        up.seldon_event("gz", "request", cp.seldon_request(1, "C"), structured=True),
        up.seldon_event("gz", "response", body, structured=True),
    )
    assert answers[1].json()["accepted"] == 1, answers[1].text
    assert rows(served, "gz")["gz"]["pred"] == 11


def test_kserve_bad_json_reaches_ingest_rejected_total_once(served: ServeProcess) -> None:
    """A CloudEvent refused by the adapter counts in ``patchd_ingest_rejected_total`` (what
    PatchdIngestRejecting reads) as well as in ``patchd_capture_rejected_total``; a joined pair's
    event that ingest refuses counts in ingest only, once."""

    def now() -> dict[str, float]:
        return {
            f"{name}:{reason}": metric(
                served, f"patchd_{name}_rejected_total", source="kserve", reason=reason
            )
            for name in ("ingest", "capture")
            for reason in ("bad_json", "invalid_value")
        }

    before = now()
    bad = send(served, KSERVE, up.kserve_event("rj-bad", "response", b'{"predictions": [1'))
    assert bad[0].status_code == 400 and bad[0].json()["reason"] == "bad_json"
    refused = send(
        served,
        KSERVE,
        up.kserve_event("rj-pair", "request", up.instances_body([[1.0, 2.0]])),
        up.kserve_event("rj-pair", "response", b'{"predictions": [99]}'),  # no class 99
    )
    assert [a.status_code for a in refused] == [200, 200]
    assert [r["reason"] for r in refused[1].json()["rejected"]] == ["invalid_value"]
    after = now()
    assert {k: after[k] - before[k] for k in after} == {
        "ingest:bad_json": 1,
        "capture:bad_json": 1,
        "ingest:invalid_value": 1,
        "capture:invalid_value": 0,
    }
    assert not rows(served, "rj-")

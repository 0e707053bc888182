"""Parsers of the capture sources: OIP (JSON and binary), v1, Seldon, CloudEvents, join, mapping."""

from __future__ import annotations

import base64
import gzip
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchd.exceptions import ConfigError, ValidationError
from patchd.plugins.sources.cloudevents import parse_cloudevent
from patchd.plugins.sources.join import PairJoiner
from patchd.plugins.sources.mapping import check_mapping, map_record
from patchd.plugins.sources.payloads import (
    InputRef,
    Prediction,
    decode_binary,
    oip_inputs,
    parse_oip_tensors,
    prediction_from_value,
    predictions_from_outputs,
    split_binary,
    v1_inputs,
)
from patchd.plugins.sources.seldon import seldon_inputs, seldon_predictions
from tests import capture_payloads as cp

CLASSES = ("benign", "malignant")


def reason(fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError) as info:
        fn(*args)
    return info.value.reason


# ----------------------------------------------------------------------------- OIP / binary


def test_binary_extension_response_with_and_without_header_length() -> None:
    body, n = cp.binary_response([[0.25, 0.75], [1.0, 0.0]])
    for length in (n, None):
        header, tail = split_binary(body, length)
        outputs = parse_oip_tensors(header, "outputs", tail)
        assert outputs[0].shape == (2, 2) and outputs[0].data == (0.25, 0.75, 1.0, 0.0)
        preds = predictions_from_outputs(outputs, CLASSES)
        assert preds == [Prediction(1, (0.25, 0.75)), Prediction(0, (1.0, 0.0))]


def test_binary_bytes_tensor_gives_inline_inputs() -> None:
    body, n = cp.binary_request([cp.PNG, b"file:///srv/a.png"])
    header, tail = split_binary(body, None)
    inputs = oip_inputs(parse_oip_tensors(header, "inputs", tail), inline=True)
    assert inputs == [InputRef(data=cp.PNG), InputRef(uri="file:///srv/a.png")]
    off = oip_inputs(parse_oip_tensors(header, "inputs", tail), inline=False)[0]
    assert off == InputRef(dropped="inline_disabled")  # counted as dropped, not silently lost


@pytest.mark.parametrize(
    ("datatype", "values", "code"),
    [
        ("INT64", [3, -1], "q"),
        ("FP16", [0.5, 2.0], "e"),
        ("UINT8", [1, 255], "B"),
        ("FP64", [0.1, 0.2], "d"),
        ("BOOL", [True, False], "?"),
    ],
)
def test_decode_binary_datatypes(datatype: str, values: list, code: str) -> None:
    raw = struct.pack(f"<{len(values)}{code}", *values)
    assert decode_binary(datatype, raw) == pytest.approx(values)


def test_binary_errors_name_a_reason() -> None:
    body, n = cp.binary_response([[0.25, 0.75]])
    header, tail = split_binary(body, n)
    assert reason(parse_oip_tensors, header, "outputs", tail[:-1]) == "binary_truncated"
    assert reason(parse_oip_tensors, header, "outputs", tail + b"xx") == "binary_truncated"
    assert reason(split_binary, body, len(body) + 5) == "binary_header"
    assert reason(decode_binary, "BF16", b"\x00\x00") == "unsupported_datatype"
    assert reason(decode_binary, "FP32", b"\x00\x00\x00") == "binary_truncated"
    assert reason(decode_binary, "BYTES", b"\x05\x00\x00\x00ab") == "binary_truncated"


def test_oip_json_label_tensor_and_shape_checks() -> None:
    header = {
        "outputs": [
            {"name": "label", "shape": [2], "datatype": "BYTES", "data": ["malignant", "benign"]},
            {
                "name": "probs",
                "shape": [2, 2],
                "datatype": "FP32",
                "data": [[0.1, 0.9], [0.8, 0.2]],
            },
        ]
    }
    preds = predictions_from_outputs(parse_oip_tensors(header, "outputs"), CLASSES)
    assert preds == [Prediction(1, (0.1, 0.9)), Prediction(0, (0.8, 0.2))]
    only = predictions_from_outputs(parse_oip_tensors(header, "outputs"), CLASSES, "label")
    assert only == [Prediction(1), Prediction(0)]
    bad = {"outputs": [{"name": "p", "shape": [2, 2], "datatype": "FP32", "data": [0.1, 0.9]}]}
    assert reason(parse_oip_tensors, bad, "outputs") == "shape_mismatch"
    assert reason(parse_oip_tensors, {"outputs": []}, "outputs") == "unsupported_body"
    unknown = {"outputs": [{"name": "l", "shape": [1], "datatype": "BYTES", "data": ["cat"]}]}
    assert (
        reason(predictions_from_outputs, parse_oip_tensors(unknown, "outputs"), CLASSES)
        == "unknown_class"
    )


@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400)))
@settings(max_examples=300, deadline=None)
def test_oip_parser_fuzz_raises_only_validation_errors(body: bytes, length: int | None) -> None:
    try:
        header, tail = split_binary(body, length)
        outputs = parse_oip_tensors(header, "outputs", tail)
        predictions_from_outputs(outputs, CLASSES)
    except ValidationError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
        max_leaves=12,
    )
)
@settings(max_examples=300, deadline=None)
def test_v1_and_seldon_parsers_fuzz(value: object) -> None:
    for fn in (
        lambda: prediction_from_value(value, CLASSES),
        lambda: seldon_predictions({"data": {"ndarray": value}}, CLASSES),
        lambda: v1_inputs({"instances": value}, True),
    ):
        try:
            fn()
        except ValidationError:
            pass


# ----------------------------------------------------------------------------- v1 / JSON values


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, Prediction(1)),
        ("malignant", Prediction(1)),
        ([0.2, 0.8], Prediction(1, (0.2, 0.8))),
        ([[0.7, 0.3]], Prediction(0, (0.7, 0.3))),
        ([0.9], Prediction(1, (pytest.approx(0.1), 0.9))),
        ({"label": "benign", "probabilities": [0.6, 0.4]}, Prediction(0, (0.6, 0.4))),
        ({"scores": [0.0, 0.0]}, Prediction(0, (0.5, 0.5))),
    ],
)
def test_prediction_from_value(value: object, expected: Prediction) -> None:
    assert prediction_from_value(value, CLASSES) == expected


def test_logits_are_softmaxed() -> None:
    p = prediction_from_value([2.0, -1.0], CLASSES)
    assert p.pred == 0 and sum(p.probs or ()) == pytest.approx(1.0) and p.probs[0] > 0.9  # type: ignore[index]


def test_v1_inputs_recognise_b64_and_uris() -> None:
    b64 = base64.b64encode(cp.PNG).decode()
    body = {
        "instances": [
            {"b64": b64},
            {"image": {"b64": b64}},
            "s3://bucket/x.png",
            {"image_uri": "file:///a.png"},
            [[0.1]],
        ]
    }
    assert v1_inputs(body, inline=True) == [
        InputRef(data=cp.PNG),
        InputRef(data=cp.PNG),
        InputRef(uri="s3://bucket/x.png"),
        InputRef(uri="file:///a.png"),
        InputRef(dropped="no_image"),  # a feature row: counted as dropped, not silently lost
    ]
    assert reason(v1_inputs, {"nothing": 1}, True) == "unsupported_body"


# ----------------------------------------------------------------------------- Seldon


def test_seldon_messages() -> None:
    assert len(seldon_inputs(json.loads(cp.seldon_request(3, "A")), True)) == 3
    tensor = {"data": {"tensor": {"shape": [2, 2], "values": [0.9, 0.1, 0.3, 0.7]}}}
    assert seldon_predictions(tensor, CLASSES) == [
        Prediction(0, (0.9, 0.1)),
        Prediction(1, (0.3, 0.7)),
    ]
    assert seldon_inputs({"binData": base64.b64encode(cp.PNG).decode()}, True) == (
        InputRef(data=cp.PNG),
    )
    assert seldon_inputs({"strData": "/srv/x.png"}, True) == (InputRef(uri="/srv/x.png"),)
    assert seldon_predictions({"jsonData": {"predictions": [1]}}, CLASSES) == [Prediction(1)]
    assert reason(seldon_predictions, {"status": {"code": 500}}, CLASSES) == "unsupported_body"
    bad = {"data": {"tensor": {"shape": [3], "values": [1, 2]}}}
    assert reason(seldon_predictions, bad, CLASSES) == "shape_mismatch"


# ----------------------------------------------------------------------------- CloudEvents


def test_cloudevent_binary_structured_and_gzip() -> None:
    body = cp.v1_response([[0.1, 0.9]])
    ev = parse_cloudevent(cp.kserve_headers("a", "response"), body)
    assert (ev.id, ev.type, ev.attr("inferenceservicename"), ev.data) == (
        "a",
        "org.kubeflow.serving.inference.response",
        "skin",
        body,
    )
    plain = parse_cloudevent(
        {**cp.kserve_headers("a", "response"), "Inference-Header-Content-Length": "42"}, body
    )
    assert plain.attr("inferenceheadercontentlength") == "42"
    gz = parse_cloudevent(
        {**cp.kserve_headers("a", "response"), "Content-Encoding": "gzip"}, gzip.compress(body)
    )
    assert gz.data == body
    envelope = {
        "specversion": "1.0",
        "id": "s",
        "type": "t",
        "source": "x",
        "data": {"a": 1},
        "requestid": "r",
    }
    ev = parse_cloudevent(
        {"content-type": "application/cloudevents+json"}, json.dumps(envelope).encode()
    )
    assert (ev.id, ev.type, json.loads(ev.data), ev.attr("requestid")) == ("s", "t", {"a": 1}, "r")
    assert reason(parse_cloudevent, {"content-type": "application/json"}, b"{}") == "bad_cloudevent"
    assert (
        reason(parse_cloudevent, {"ce-id": "a", "ce-type": "t", "content-encoding": "gzip"}, b"xx")
        == "bad_gzip"
    )
    assert (
        reason(parse_cloudevent, {"content-type": "application/cloudevents-batch+json"}, b"[]")
        == "unsupported_body"
    )


# ----------------------------------------------------------------------------- join


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_join_any_order_duplicates_and_ttl() -> None:
    clock = Clock()
    j: PairJoiner[str] = PairJoiner(10.0, 100, clock=clock)
    assert j.add("a", "response", "R")[0].status == "buffered"
    assert j.add("a", "response", "R")[0].status == "duplicate"
    out, _ = j.add("a", "request", "Q")
    assert out.status == "joined" and (out.pair.request, out.pair.response) == ("Q", "R")  # type: ignore[union-attr]
    assert j.add("a", "request", "Q")[0].status == "duplicate"  # after the join, within the TTL
    j.add("b", "request", "Q2")
    clock.now = 11.0
    expired = j.expire()
    assert [(p.key, p.request, p.response) for p in expired] == [("b", "Q2", None)]
    c = j.counts()
    assert (c.pending, c.joined, c.duplicates, c.orphan_requests, c.orphan_responses) == (
        0,
        1,
        2,
        1,
        0,
    )


def test_join_memory_is_bounded_by_count_and_bytes() -> None:
    j: PairJoiner[bytes] = PairJoiner(1e9, 3, max_bytes=100, weigh=len)
    expired = []
    for i in range(10):
        expired += j.add(f"k{i}", "response", b"x")[1]
    assert j.counts().pending == 3 and len(expired) == 7 and expired[0].key == "k0"
    expired = j.add("big", "response", b"y" * 99)[1]
    assert [p.key for p in expired] == ["k7", "k8"] and j.counts().pending == 2  # 1 + 99 bytes


def test_join_restore_lets_a_retried_half_complete() -> None:
    j: PairJoiner[str] = PairJoiner(10.0, 100, clock=Clock())
    j.add("a", "request", "Q")
    out, _ = j.add("a", "response", "R")
    j.restore(out.pair, "request")  # type: ignore[arg-type]
    again, _ = j.add("a", "response", "R")
    assert again.status == "joined" and j.counts().joined == 1


# ----------------------------------------------------------------------------- mapping


def test_bentoml_record_shape() -> None:
    line = json.loads(cp.bentoml_line(7, 1, [0.2, 0.8], "A", "file:///x.png"))
    assert map_record("bentoml", {}, line) == {
        "id": 7,
        "ts": "2026-11-23T10:00:00.123456",
        "pred": 1,
        "probs": [0.2, 0.8],
        "input": {"uri": "file:///x.png"},
        "groups": {"site": "A", "caption": "a photo"},
    }
    override = map_record("bentoml", {"id": "=fixed", "groups.site": "caption"}, line)
    assert override["id"] == "fixed" and override["groups"]["site"] == "a photo"


def test_generic_mapping_paths_alternatives_and_literals() -> None:
    mapping = {
        "id": "meta.rid|meta.id",
        "pred": "out.result.0",
        "probs": "out.scores",
        "groups.site": "tags.site",
        "model": "=skin",
        "input.uri": "req.image",
    }
    raw = {
        "meta": {"id": "r9"},
        "out": {"result": [1], "scores": [0.1, 0.9]},
        "tags": {"site": "Z"},
    }
    assert map_record("mapping", mapping, raw) == {
        "id": "r9",
        "pred": 1,
        "probs": [0.1, 0.9],
        "groups": {"site": "Z"},
        "model": "skin",
    }
    with pytest.raises(ConfigError, match="not a schema-v1 field"):
        check_mapping("mapping", {"pred": "a", "prediction": "b"})
    with pytest.raises(ConfigError, match="needs at least 'pred'"):
        check_mapping("mapping", {"id": "a"})
    with pytest.raises(ConfigError, match="has no mapping"):
        check_mapping("jsonl", {})
    assert reason(map_record, "bentoml", {}, [1, 2]) == "wrong_type"

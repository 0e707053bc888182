"""The schema-v1 parser: every bad field gets its reason code; a hypothesis fuzz of the parser."""

from __future__ import annotations

import base64
import os
from array import array
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from patchd.config import build_config
from patchd.exceptions import PathNotAllowedError, ValidationError
from patchd.ingest.records import (
    EventParser,
    GroupCap,
    Prediction,
    is_malformed,
    split_body,
)
from tests import capture_payloads as cp

PNG = cp.PNG  # a real 1x1 PNG: inline inputs are decoded before they are stored


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    return tmp_path / "images"


def make_parser(tmp_path: Path, **groups: Any) -> EventParser:
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"name": "skin", "class_names": ["benign", "malignant"]},
            "groups": groups or {"attributes": ["site"], "max_values": 2},
            "sources": {"allowed_roots": [str(tmp_path / "images")], "max_inline_bytes": 4096},
        }
    )
    return EventParser(config)


GOOD = {
    "id": "r-1",
    "ts": "2026-11-23T10:00:00Z",
    "model": "skin",
    "model_version": "sha256:abc",
    "pred": 1,
    "probs": [0.1, 0.9],
    "groups": {"site": "B"},
    "embedding": [1.0, 2.0],
    "label": None,
}


def test_valid_event_parses_to_a_typed_record(tmp_path: Path, roots: Path) -> None:
    rec = make_parser(tmp_path).prediction(
        {**GOOD, "input": {"uri": f"file://{roots}/a.png"}}, "http", 5.0
    )
    assert isinstance(rec, Prediction)
    assert (rec.model, rec.id, rec.pred, rec.label, rec.source) == ("skin", "r-1", 1, None, "http")
    assert rec.ts == 1795428000.0
    assert rec.confidence == pytest.approx(0.9)
    assert array("f", rec.probs).tolist() == pytest.approx([0.1, 0.9])
    assert array("f", rec.embedding).tolist() == [1.0, 2.0]
    assert (rec.group_key, orjson.loads(rec.groups)) == ("site=B", {"site": "B"})
    assert rec.input_uri == f"file://{roots}/a.png"
    assert rec.ingested_at == 5.0


def test_defaults_model_ts_and_class_names(tmp_path: Path) -> None:
    rec = make_parser(tmp_path).prediction(
        {"id": 7, "pred": "malignant", "label": "benign"}, "t", 9.0
    )
    assert (rec.model, rec.id, rec.pred, rec.label, rec.ts) == ("skin", "7", 1, 0, 9.0)
    assert rec.group_key == "site=unknown"


@pytest.mark.parametrize(
    ("patch", "reason", "field"),
    [
        ({"id": None}, "missing_field", "id"),
        ({"pred": None}, "missing_field", "pred"),
        ({"id": ""}, "invalid_value", "id"),
        ({"id": "x" * 300}, "too_large", "id"),
        ({"id": 1.5}, "wrong_type", "id"),
        ({"pred": "5"}, "invalid_value", "pred"),  # a decimal string is an index: out of range
        ({"pred": "cat"}, "invalid_value", "pred"),
        ({"pred": 2}, "invalid_value", "pred"),
        ({"pred": True}, "wrong_type", "pred"),
        ({"pred": [1]}, "wrong_type", "pred"),
        ({"label": -1}, "invalid_value", "label"),
        ({"model": "other"}, "unknown_model", "model"),
        ({"model": 3}, "wrong_type", "model"),
        ({"ts": "yesterday"}, "invalid_value", "ts"),
        ({"ts": True}, "wrong_type", "ts"),
        ({"ts": -5}, "invalid_value", "ts"),
        ({"ts": 10**30}, "invalid_value", "ts"),
        ({"probs": [0.5]}, "invalid_value", "probs"),
        ({"probs": [0.5, "x"]}, "wrong_type", "probs"),
        ({"probs": [0.5, 1.5]}, "invalid_value", "probs"),
        ({"probs": "0.5"}, "wrong_type", "probs"),
        ({"embedding": [float("nan")]}, "invalid_value", "embedding"),
        ({"embedding": [1e39]}, "invalid_value", "embedding"),
        ({"embedding": [0.0] * 9000}, "too_large", "embedding"),
        ({"groups": ["B"]}, "wrong_type", "groups"),
        ({"groups": {"site": {"x": 1}}}, "wrong_type", "groups.site"),
        ({"groups": {"site": "a,b"}}, "invalid_value", "groups.site"),
        ({"groups": {"site": "x" * 100}}, "too_large", "groups.site"),
        ({"model_version": 5}, "wrong_type", "model_version"),
        ({"schema": 2}, "invalid_value", "schema"),
        ({"input": 5}, "wrong_type", "input"),
        ({"input": {"nothing": 1}}, "missing_field", "input"),
        ({"input": "http://example.com/a.png"}, "invalid_value", "input"),
        ({"input": "relative/a.png"}, "invalid_value", "input"),
        ({"input": "file://remotehost/a.png"}, "invalid_value", "input"),
        ({"input": {"base64": "@@@"}}, "invalid_value", "input.base64"),
        (
            {"input": {"base64": base64.b64encode(b"GIF89a").decode()}},
            "invalid_value",
            "input.base64",
        ),
        ({"input": {"base64": "A" * 10000}}, "too_large", "input.base64"),
    ],
)
def test_bad_fields_name_field_and_reason(
    tmp_path: Path, roots: Path, patch: dict[str, Any], reason: str, field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        make_parser(tmp_path).prediction({**GOOD, **patch}, "http")
    assert info.value.reason == reason
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="must be an object") as info:
        make_parser(tmp_path).prediction([1, 2], "http")
    assert info.value.reason == "wrong_type"


@pytest.mark.parametrize(
    "uri",
    [
        "{root}/../secret.png",
        "file://{root}/../../etc/passwd",
        "file://{root}/%2e%2e/secret.png",
        "/etc/passwd",
        "{root}/link/secret.png",  # a symlink inside the root pointing outside
        "{root}2/x.png",  # a sibling whose name starts with the root's name
    ],
)
def test_path_traversal_in_input_uris_is_refused(tmp_path: Path, roots: Path, uri: str) -> None:
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", roots / "link")
    with pytest.raises(PathNotAllowedError) as info:
        make_parser(tmp_path).prediction({**GOOD, "input": uri.format(root=roots)}, "http")
    assert info.value.reason == "path_not_allowed"
    assert "sources.allowed_roots" in str(info.value)


def test_inline_base64_is_stored_by_content_hash(tmp_path: Path) -> None:
    parser = make_parser(tmp_path)
    rec = parser.prediction({**GOOD, "input": {"base64": base64.b64encode(PNG).decode()}}, "http")
    assert rec.input_uri is not None and rec.input_uri.endswith(".png")
    stored = Path(rec.input_uri.removeprefix("file://"))
    assert stored.parent == tmp_path / "state" / "artifacts" / "inputs"
    assert stored.read_bytes() == PNG
    again = parser.prediction({**GOOD, "input": {"base64": base64.b64encode(PNG).decode()}}, "h")
    assert again.input_uri == rec.input_uri


def test_group_cardinality_cap_sends_new_values_to_other(tmp_path: Path) -> None:
    parser = make_parser(tmp_path)
    keys = [parser.prediction({**GOOD, "groups": {"site": s}}, "h").group_key for s in "ABCA"]
    assert keys == ["site=A", "site=B", "site=other", "site=A"]
    restored = GroupCap(parser.groups_config, parser.groups.snapshot())
    assert restored.key({"site": "C"})[0] == "site=other"
    assert restored.key({"site": "B"})[0] == "site=B"


def test_fixed_group_values(tmp_path: Path) -> None:
    parser = make_parser(tmp_path, attributes=["site", "cam"], values={"site": ["A"]})
    rec = parser.prediction({**GOOD, "groups": {"site": "B", "cam": 3}}, "h")
    assert rec.group_key == "site=other,cam=3"
    assert orjson.loads(rec.groups) == {"site": "other", "cam": "3"}


def test_labels(tmp_path: Path) -> None:
    parser = make_parser(tmp_path)
    assert parser.label({"id": "a", "label": 1}, 3.0) == ("skin", "a", 1, 3.0)
    for bad, reason in [
        ({"id": "a"}, "missing_field"),
        ({"label": 1}, "missing_field"),
        ({"id": "a", "label": 1, "model": "x"}, "unknown_model"),
        ("a", "wrong_type"),
    ]:
        with pytest.raises(ValidationError) as info:
            parser.label(bad)
        assert info.value.reason == reason


def test_split_body_array_object_ndjson() -> None:
    assert split_body(b'[{"a":1},{"b":2}]') == ([{"a": 1}, {"b": 2}], [])
    assert split_body(b'{"a":1}') == ([{"a": 1}], [])
    records, errors = split_body(b'{"a":1}\n{bad\n\n{"c":3}\n')
    assert [r for r in records if not is_malformed(r)] == [{"a": 1}, {"c": 3}]
    assert records[3] == {"c": 3}  # indices stay line numbers
    assert [(e.index, e.reason) for e in errors] == [(1, "malformed_json")]
    records, errors = split_body(b'[{"a":1},')
    assert records == [] and errors[0].index == -1 and errors[0].reason == "malformed_json"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(max_size=300), st.integers(), json_values),
        "ts": st.one_of(st.floats(), st.integers(), st.text(max_size=30), json_values),
        "model": st.one_of(st.just("skin"), st.text(max_size=5), json_values),
        "pred": st.one_of(st.integers(-3, 5), st.sampled_from(["benign", "x"]), json_values),
        "label": st.one_of(st.none(), st.integers(-1, 3), json_values),
        "probs": st.one_of(st.lists(st.floats(), max_size=3), json_values),
        "groups": st.one_of(st.dictionaries(st.just("site"), json_values), json_values),
        "embedding": st.one_of(st.lists(st.floats(width=32), max_size=5), json_values),
        "input": st.one_of(st.text(max_size=40), json_values),
        "model_version": json_values,
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(obj=st.one_of(event_like, json_values))
def test_fuzz_parser_only_raises_validation_errors(tmp_path: Path, obj: object) -> None:
    """Any JSON value: a valid record (round-trips) or a ValidationError with a known reason."""
    parser = make_parser(tmp_path)
    try:
        rec = parser.prediction(obj, "fuzz", 1.0)
    except ValidationError as err:
        assert err.reason in {
            "missing_field",
            "wrong_type",
            "invalid_value",
            "unknown_model",
            "path_not_allowed",
            "too_large",
        }
        return
    assert isinstance(obj, dict)
    assert rec.model == "skin" and 0 <= rec.pred < 2 and rec.id
    assert rec.label is None or 0 <= rec.label < 2
    assert orjson.loads(rec.groups).keys() == {"site"}


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200))
def test_fuzz_split_body_never_crashes(body: bytes) -> None:
    records, errors = split_body(body)
    assert all(e.reason == "malformed_json" for e in errors)


near_valid = st.fixed_dictionaries(
    {
        "id": st.one_of(st.text(min_size=1, max_size=4), st.integers(), st.just("")),
        "pred": st.one_of(st.integers(-1, 2), st.booleans(), st.sampled_from(["benign", 1.0])),
    },
    optional={
        "ts": st.one_of(
            st.none(), st.floats(), st.integers(), st.sampled_from(["2026-01-01", "x"])
        ),
        "model": st.sampled_from([None, "skin", "other", 1]),
        "label": st.one_of(st.none(), st.integers(-1, 2), st.booleans()),
        "probs": st.one_of(st.none(), st.lists(st.one_of(st.floats(), st.integers()), max_size=3)),
        "groups": st.one_of(
            st.none(),
            st.dictionaries(
                st.just("site"), st.sampled_from(["A", "B", "C", 1, True, None, "a,b"])
            ),
        ),
        "model_version": st.one_of(st.none(), st.text(max_size=3), st.integers()),
        "schema": st.sampled_from([None, 1, 2]),
        "input": st.sampled_from(
            [
                None,
                "@/a.png",
                {"uri": "@/a.png"},
                {"uri": "file://@/d/../a.png"},
                {"path": "@/a.png"},
                {"uri": "@/a.png", "x": 1},
                {"uri": 3},
                "@/missing.png",
                "@/../outside.png",
                "/etc/passwd",
                "relative.png",
                "http://h/x.png",
                3,
            ]
        ),  # fmt: skip
    },
)


def _rooted(value: object, root: str) -> object:
    """Put the fuzz test's allowed root in place of ``@`` in an input."""
    if isinstance(value, str):
        return value.replace("@", root)
    if isinstance(value, dict):
        return {k: _rooted(v, root) for k, v in value.items()}
    return value


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(obj=near_valid)
def test_fuzz_fast_path_agrees_with_full_validation(tmp_path: Path, obj: dict[str, Any]) -> None:
    """The fast path either declines (None) or returns exactly what full validation returns."""
    parser = make_parser(tmp_path)
    for value in ("A", "B"):  # warm the group memo so the fast path can hit
        parser.groups.key({"site": value})
    (tmp_path / "images" / "d").mkdir(parents=True, exist_ok=True)
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    if "input" in obj:
        obj = obj | {"input": _rooted(obj["input"], str(tmp_path / "images"))}
    fast = parser._fast(obj, "fuzz", 1.0)
    if fast is None:
        return
    assert fast == parser._full(obj, "fuzz", 1.0)
    assert type(fast) is Prediction


def test_fast_path_is_taken_for_clean_events(tmp_path: Path) -> None:
    parser = make_parser(tmp_path)
    parser.prediction(GOOD | {"embedding": None}, "h")  # admits site=B into the memo
    clean = {k: v for k, v in GOOD.items() if k != "embedding"}
    assert parser._fast(clean, "h", 1.0) == parser._full(clean, "h", 1.0)


def test_fast_path_resolves_allow_listed_inputs_and_declines_the_rest(tmp_path: Path) -> None:
    parser = make_parser(tmp_path)
    parser.groups.key(None)  # the fast path only takes group values already seen
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "images" / "out.png").symlink_to("/etc/passwd")
    clean = {"id": "r", "pred": 1, "ts": 5.0}
    root = str(tmp_path / "images")
    for good in (f"{root}/a.png", {"uri": f"file://{root}/a.png"}):
        fast = parser._fast(clean | {"input": good}, "h", 1.0)
        assert fast is not None and fast.input_uri == (tmp_path / "images" / "a.png").as_uri()
        assert fast == parser._full(clean | {"input": good}, "h", 1.0)
    for bad in (f"{root}/out.png", f"{root}/../x.png", "/etc/passwd", {"uri": 3}, "x.png"):
        assert parser._fast(clean | {"input": bad}, "h", 1.0) is None
        with pytest.raises(ValidationError):
            parser._full(clean | {"input": bad}, "h", 1.0)

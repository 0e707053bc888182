"""Hypothesis strategies for hostile ingest input, shared by the HTTP, CloudEvents and tail tests.

Every generated record comes with what serve must do with it: a :class:`Fragment` is the JSON
text of one record (text, so that it can hold what ``orjson.dumps`` refuses to write: 5000-digit
integers, ``1e999``, 2000-deep nesting) and ``valid`` (it must be stored) or the reason family it
must be rejected with. Valid records carry unique ids (``ok-<n>``), invalid ones ``bad-<n>`` where
they have an id at all, so the store can be checked for both.
"""

from __future__ import annotations

import base64
import gzip
import itertools
import json
from dataclasses import dataclass

from hypothesis import strategies as st

from tests import capture_payloads as cp

_counter = itertools.count()
CLASSES = ("benign", "malignant")


def fresh(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


@dataclass(frozen=True)
class Fragment:
    text: str  # the JSON text of one record (or garbage, for NDJSON lines)
    valid: bool
    ident: str | None = None  # the id it is stored under when valid
    json_ok: bool = True  # orjson parses it (else only NDJSON can carry it, as its own line)


def _valid(draw: st.DrawFn) -> Fragment:
    ident = fresh("ok")
    event: dict[str, object] = {"id": ident, "pred": draw(st.sampled_from([0, 1, *CLASSES]))}
    if draw(st.booleans()):
        p = draw(st.floats(0.0, 1.0))
        event["probs"] = [1.0 - p, p] if 0.0 <= 1.0 - p <= 1.0 else [0.5, 0.5]
    if draw(st.booleans()):
        event["groups"] = {"site": draw(st.sampled_from(["A", "B", 3, True, None]))}
    if draw(st.booleans()):
        event["ts"] = draw(st.sampled_from(["2026-11-23T10:00:00Z", 1.8e9, 1_700_000_000]))
    if draw(st.integers(0, 5)) == 0:
        event["input"] = {"base64": base64.b64encode(cp.PNG).decode()}
    if draw(st.booleans()):
        event["label"] = draw(st.sampled_from([0, 1, None]))
    return Fragment(json.dumps(event), True, ident)


_BAD_FIELDS: list[tuple[str, str]] = [
    ('"pred": 7', "out of range"),
    ('"pred": [1]', "list pred"),
    ('"pred": 1, "groups": {"site": ["x"]}', "list group value"),
    ('"pred": 1, "groups": {"site": {"a": 1}}', "object group value"),
    ('"pred": 1, "groups": ["site"]', "groups not an object"),
    ('"pred": 1, "ts": "not a time"', "bad ts"),
    ('"pred": 1, "ts": 1e300', "ts out of range"),
    ('"pred": 1, "probs": [0.5]', "probs length"),
    ('"pred": 1, "probs": [2.0, -1.0]', "probs range"),
    ('"pred": 1, "model": "other"', "unknown model"),
    ('"pred": 1, "schema": 2', "schema"),
    ('"pred": 1, "input": {"base64": "!!not base64!!"}', "bad base64"),
    ('"pred": 1, "input": "/etc/passwd"', "path outside the roots"),
    ('"pred": 1, "input": {"nope": 1}', "input without uri"),
    ('"pred": 1, "embedding": ["x"]', "embedding"),
    ('"label": 1', "missing pred"),
]


def _png_tail(junk: bytes) -> str:
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + junk).decode()


@st.composite
def invalid(draw: st.DrawFn) -> Fragment:
    """A record serve must reject (never store)."""
    kind = draw(st.integers(0, 7))
    if kind <= 2:
        body, _ = draw(st.sampled_from(_BAD_FIELDS))
        return Fragment(f'{{"id": "{fresh("bad")}", {body}}}', False)
    if kind == 3:  # any bytes after a PNG magic number are not an image
        junk = draw(st.binary(min_size=0, max_size=64))
        return Fragment(
            json.dumps({"id": fresh("bad"), "pred": 1, "input": {"base64": _png_tail(junk)}}), False
        )
    if kind == 4:  # not an object at all
        return Fragment(draw(st.sampled_from(["5", '"text"', "null", "[1, 2]", "true"])), False)
    if kind == 5:  # an id no branch expected
        nested = "[" * 50 + "]" * 50
        return Fragment(f'{{"id": {nested}, "pred": 1}}', False)
    if kind == 6:  # a number orjson refuses: the record cannot be parsed (NDJSON line only)
        digits = "9" * draw(st.integers(400, 5000))
        return Fragment(f'{{"id": "{fresh("bad")}", "pred": {digits}}}', False, json_ok=False)
    depth = draw(st.integers(1100, 10_000))  # deeper than any parser's limit (NDJSON line only)
    return Fragment("[" * depth + "]" * depth, False, json_ok=False)


@st.composite
def valid(draw: st.DrawFn) -> Fragment:
    return _valid(draw)


def record() -> st.SearchStrategy[Fragment]:
    return st.one_of(valid(), invalid())


garbage_line = st.binary(min_size=1, max_size=200).filter(
    lambda b: b"\n" not in b and b.strip() != b"" and not _parses(b)
)


def _parses(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except (ValueError, RecursionError):
        return False
    return True


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str
    fragments: tuple[Fragment, ...]  # one per record (NDJSON: per line, garbage lines invalid)

    @property
    def invalid_indices(self) -> set[int]:
        return {i for i, f in enumerate(self.fragments) if not f.valid}

    @property
    def valid_ids(self) -> list[str]:
        return [f.ident for f in self.fragments if f.valid and f.ident]


@st.composite
def prediction_body(draw: st.DrawFn) -> Body:
    """A JSON array (records orjson parses) or NDJSON (anything, garbage lines included)."""
    if draw(st.booleans()):
        frags = draw(st.lists(record().filter(lambda f: f.json_ok), min_size=1, max_size=30))
        data = ("[" + ",".join(f.text for f in frags) + "]").encode()
        return Body(data, "application/json", tuple(frags))
    lines: list[bytes] = []
    frags_out: list[Fragment] = []
    for item in draw(st.lists(st.one_of(record(), garbage_line), min_size=1, max_size=30)):
        if isinstance(item, bytes):  # a line that is not JSON: one malformed_json rejection
            lines.append(item)
            frags_out.append(Fragment("", False, json_ok=False))
        else:
            lines.append(item.text.encode())
            frags_out.append(item)
    return Body(b"\n".join(lines), "application/x-ndjson", tuple(frags_out))


def ndjson_body() -> st.SearchStrategy[Body]:
    """Bodies as NDJSON only (what the tail source reads)."""
    return prediction_body().map(
        lambda b: b if b.content_type.endswith("ndjson") else _as_ndjson(b)
    )


def _as_ndjson(body: Body) -> Body:
    data = b"\n".join(f.text.encode() for f in body.fragments)
    return Body(data, "application/x-ndjson", body.fragments)


# ----------------------------------------------------------------------------- CloudEvents


@dataclass(frozen=True)
class CloudEventCase:
    request: bytes | None  # the request half's body (None: send only the response)
    response: bytes
    gzip_response: bool
    expect: int | str  # events the pair must become; "refused": a 4xx; "any": 200 or 4xx


def _hostile_json(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        depth = draw(st.integers(1000, 10_000))
        return ("[" * depth + "]" * depth).encode()
    if kind == 1:
        return ('{"predictions": [' + "7" * draw(st.integers(4301, 6000)) + "]}").encode()
    if kind == 2:
        return b'{"predictions": [' + b",".join([b"[]"] * draw(st.integers(2000, 20_000))) + b"]}"
    if kind == 3:
        return draw(st.binary(min_size=0, max_size=300))
    if kind == 4:
        shape = draw(st.sampled_from([[10**9, 0], [-1], ["x"], [10**30]]))
        tensor = {"name": "p", "shape": shape, "datatype": "FP32", "data": []}
        return json.dumps({"outputs": [tensor]}).encode()
    if kind == 5:
        return json.dumps({"data": {"tensor": {"shape": [10**8], "values": []}}}).encode()
    return b""


def _any_json(draw: st.DrawFn) -> bytes:
    value = draw(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
            max_leaves=30,
        )
    )
    return json.dumps({"predictions": value}).encode()


@st.composite
def cloudevent_case(draw: st.DrawFn, max_instances: int) -> CloudEventCase:
    gz = draw(st.booleans())
    kind = draw(st.integers(0, 3))
    if kind == 0:  # hostile: must be a counted 4xx
        return CloudEventCase(None, _hostile_json(draw), gz, "refused")
    if kind == 1:  # any JSON at all: a 200 (possibly rejecting its events) or a 4xx
        return CloudEventCase(None, _any_json(draw), gz, "any")
    n = draw(st.integers(1, max_instances + 8))
    request = cp.v1_request(n) if draw(st.booleans()) else None
    response = cp.v1_response([[0.3, 0.7]] * n)
    return CloudEventCase(request, response, gz, n if n <= max_instances else "refused")


def gzip_bomb(decompressed: int) -> bytes:
    """A small gzip body that inflates to ``decompressed`` bytes of ``[]`` instances."""
    head, unit = b'{"instances": [', b"[],"
    body = head + unit * ((decompressed - len(head) - 3) // len(unit)) + b"[]]}"
    return gzip.compress(body, compresslevel=9)

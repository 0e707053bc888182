"""Logger events exactly as the upstream model servers send them, encoded with the official
CloudEvents SDK (binary or structured mode), and a replay generator with exact expected counts.

Facts reproduced (docs/capture.md has the table with the upstream file of each):
- KServe agent (``pkg/logger/worker.go``, ``handler.go``): binary mode; ``ce-id`` from the
  client's ``Ce-Id`` or a UUID, the same on request and response; extensions
  ``inferenceservicename``, ``namespace``, ``component``, ``endpoint``, ``metadata`` (JSON of
  the allow-listed headers under Go's canonical names, values as lists), ``recordedtime``; the
  body verbatim (leading newline included); the response carries the request's content type.
- Seldon Core v1 executor (``executor/logger/worker.go``, ``predictor/predictor_process.go``):
  binary mode; a fresh ``ce-id`` per event; ``modelid`` = the graph node, ``requestid`` = the
  request's puid shared by every node; ``endpoint`` = the predictor name; ``protocol``;
  ``io.seldon.serving.feedback`` events for feedback.

:func:`replay` builds a mixed stream from one small generator per integration (:data:`GENERATORS`);
each returns its posts, grouped in units that must be sent in order, and the counts they must give.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent

from tests import capture_payloads as cp

FIXTURES = Path(__file__).parent / "fixtures" / "kserve"
N_CLASSES = 40  # a many-class model: 1-byte labels 9..13 and 32 (whitespace bytes) are classes
CLASS_NAMES = [f"c{i}" for i in range(N_CLASSES)]
KSERVE_TIME = "2026-11-23T10:00:00.123456789Z"  # Go's RFC 3339 with nanoseconds
SELDON_TIME = "2026-11-23T10:00:05.5Z"


def sample(name: str) -> bytes:
    """An upstream KServe sample body, byte for byte (tests/fixtures/kserve/README.md)."""
    return (FIXTURES / name).read_bytes()


def probs_for(c: int, n: int = N_CLASSES) -> list[float]:
    """A probability vector whose top class is ``c`` (exact in float32: 0.5 and 0.5 / (n-1))."""
    rest = 0.5 / (n - 1)
    return [0.5 if i == c else rest for i in range(n)]


def encode(attrs: dict[str, Any], body: bytes, structured: bool) -> tuple[dict[str, str], bytes]:
    event = CloudEvent(attrs, body)
    headers, data = to_structured(event) if structured else to_binary(event)
    return {str(k): str(v) for k, v in headers.items()}, bytes(data)


# --------------------------------------------------------------------------- KServe


def kserve_event(
    ce_id: str,
    half: str,
    body: bytes,
    *,
    component: str = "predictor",
    endpoint: str = "default",
    metadata: dict[str, list[str]] | None = None,
    content_type: str = "application/json",
    structured: bool = False,
    isvc: str = "skin",
) -> tuple[dict[str, str], bytes]:
    """One KServe agent CloudEvent (``pkg/logger/worker.go``), binary mode unless structured
    (what a Knative broker in between delivers)."""
    attrs = {
        "specversion": "1.0",
        "id": ce_id,
        "type": f"org.kubeflow.serving.inference.{half}",
        "source": f"http://{isvc}-{component}-00001-deployment-7d9c/",
        "time": KSERVE_TIME,
        "recordedtime": KSERVE_TIME,
        "inferenceservicename": isvc,
        "namespace": "default",
        "component": component,
        "endpoint": endpoint,
        "metadata": json.dumps(metadata or {}),
        "datacontenttype": content_type,
    }
    return encode(attrs, body, structured)


def v1_prediction_body(classes: list[int]) -> bytes:
    return json.dumps({"predictions": [probs_for(c) for c in classes]}).encode()


def v2_probs_body(classes: list[int]) -> bytes:
    flat = [p for c in classes for p in probs_for(c)]
    output = {"name": "probs", "shape": [len(classes), N_CLASSES], "datatype": "FP32", "data": flat}
    return json.dumps({"model_name": "skin", "model_version": "7", "outputs": [output]}).encode()


def v2_rows_request(n: int) -> bytes:
    tensor = {
        "name": "input-0",
        "shape": [n, 4],
        "datatype": "FP32",
        "data": [[6.8, 2.8, 4.8, 1.4]] * n,
    }
    return json.dumps({"inputs": [tensor]}).encode()


def uint8_label_response(labels: list[int]) -> bytes:
    """An OIP response whose only output is a UINT8 label in the binary extension (no trailing
    newline: the tail is the raw bytes, e.g. b" " for class 32)."""
    raw = bytes(labels)
    spec = {
        "name": "label",
        "shape": [len(labels), 1],
        "datatype": "UINT8",
        "parameters": {"binary_data_size": len(raw)},
    }
    return json.dumps({"model_name": "skin", "outputs": [spec]}).encode() + raw


def binary_fp32_response(classes: list[int]) -> bytes:
    flat = [p for c in classes for p in probs_for(c)]
    raw = struct.pack(f"<{len(flat)}f", *flat)
    spec = {
        "name": "probs",
        "shape": [len(classes), N_CLASSES],
        "datatype": "FP32",
        "parameters": {"binary_data_size": len(raw)},
    }
    return (
        json.dumps({"model_name": "skin", "model_version": "3", "outputs": [spec]}).encode() + raw
    )


def instances_body(items: list[Any], leading: bytes = b"") -> bytes:
    return leading + json.dumps({"instances": items}, indent=1).encode() + b"\n"


# --------------------------------------------------------------------------- Seldon


def seldon_event(
    request_id: str,
    half: str,
    body: bytes,
    *,
    node: str = "skin",
    predictor: str = "default",
    protocol: str = "seldon",
    structured: bool = False,
    content_type: str = "application/json",
) -> tuple[dict[str, str], bytes]:
    """One Seldon Core v1 executor CloudEvent (``executor/logger/worker.go``)."""
    ce_type = {
        "request": "io.seldon.serving.inference.request",
        "response": "io.seldon.serving.inference.response",
        "feedback": "io.seldon.serving.feedback",
    }[half]
    attrs = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": ce_type,
        "source": "http://skin-default-0-transformer-skin:8000/",
        "time": SELDON_TIME,
        "modelid": node,
        "requestid": request_id,
        "inferenceservicename": "skin",
        "namespace": "seldon",
        "endpoint": predictor,
        "protocol": protocol,
        "datacontenttype": content_type,
    }
    return encode(attrs, body, structured)


def seldon_features(n: int) -> bytes:
    return json.dumps({"data": {"names": ["a", "b"], "ndarray": [[0.1, 0.2]] * n}}).encode()


def seldon_probs(classes: list[int], tags: dict[str, str] | None = None) -> bytes:
    meta: dict[str, Any] = {"requestPath": {"skin": "skin:1.2"}}
    if tags:
        meta["tags"] = tags
    rows = [probs_for(c) for c in classes]
    return json.dumps({"data": {"names": CLASS_NAMES, "ndarray": rows}, "meta": meta}).encode()


def seldon_graph(
    request_id: str, classes: list[int], *, predictor: str = "default", structured: bool = False
) -> list[tuple[dict[str, str], bytes]]:
    """What a transformer (parent, logger on) + model (child ``skin``, logger on) graph logs for
    one request, in the executor's order: the transformer's transform-input pair, its
    predict-children request, the model's pair, then the transformer's aggregated response."""
    n, features = len(classes), seldon_features(n=len(classes))

    def ev(node: str, half: str, body: bytes) -> tuple[dict[str, str], bytes]:
        return seldon_event(
            request_id, half, body, node=node, predictor=predictor, structured=structured
        )

    tagged = seldon_probs(classes, {"x-patchd-group-site": "A"})
    return [
        ev("transformer", "request", cp.seldon_request(n, "A")),
        ev("transformer", "response", features),
        ev("transformer", "request", features),
        ev("skin", "request", features),
        ev("skin", "response", tagged),
        ev("transformer", "response", seldon_probs(classes)),
    ]


# --------------------------------------------------------------------------- replay


Post = tuple[str, dict[str, str], bytes]  # route path, headers, body


@dataclass
class Expected:
    """Exact counts a replay must produce (per source where it says so)."""

    stored: Counter[str] = field(default_factory=Counter)  # source -> prediction rows
    with_input: Counter[str] = field(default_factory=Counter)  # source -> rows with an input
    groups: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (source, attr, value)
    joined: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    orphans: Counter[tuple[str, str]] = field(default_factory=Counter)  # (source, half)
    rejected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (source, reason)
    ignored: Counter[tuple[str, str]] = field(default_factory=Counter)
    dropped: Counter[tuple[str, str]] = field(default_factory=Counter)  # inputs dropped
    events: int = 0  # CloudEvents posted

    def add(self, other: Expected) -> None:
        for name in ("stored", "with_input", "groups", "joined", "duplicates", "orphans"):
            getattr(self, name).update(getattr(other, name))
        for name in ("rejected", "ignored", "dropped"):
            getattr(self, name).update(getattr(other, name))
        self.events += other.events


@dataclass
class Replay:
    units: list[list[Post]]  # each unit is posted in order, units in any order
    expected: Expected


Generator = Callable[[int, str], Replay]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kserve_replay(rounds: int, tag: str) -> Replay:
    """KServe v1 and v2, binary and structured mode, default and canary, transformer and
    predictor loggers, upstream samples, duplicates, orphans and bad bodies."""
    path, src = "/v1/sources/kserve", "kserve"
    mnist, mnist_v2, iris = (
        sample("mnist.json"),
        sample("mnist_v2_bytes.json"),
        sample("iris_v2_input.json"),
    )
    ex, units = Expected(), []
    site = {"X-Patchd-Group-Site": ["B"]}

    def unit(*events: tuple[dict[str, str], bytes]) -> None:
        units.append([(path, h, b) for h, b in events])
        ex.events += len(events)

    for r in range(rounds):
        k, c = f"{tag}k{r}", r % N_CLASSES
        endpoint = "canary" if r % 4 == 3 else "default"
        structured = r % 2 == 1
        opts: dict[str, Any] = {"endpoint": endpoint, "structured": structured}
        # 1. mnist.json verbatim (leading newline, {"data": <b64 PNG>}), a transformer logging too
        unit(
            kserve_event(k + "a", "request", mnist, component="transformer", **opts),
            kserve_event(k + "a", "request", mnist, metadata=site, **opts),
            kserve_event(k + "a", "response", v1_prediction_body([c]), metadata=site, **opts),
            kserve_event(
                k + "a", "response", b'{"predictions": [3]}', component="transformer", **opts
            ),
        )
        ex.ignored[(src, "other_component")] += 2
        ex.stored[src] += 1
        ex.with_input[src] += 1
        ex.groups[(src, "site", "B")] += 1
        ex.groups[(src, "endpoint", endpoint)] += 1
        ex.joined[src] += 1
        # 2. v2 iris rows (no image: inputs dropped, counted), the response twice
        unit(
            kserve_event(k + "b", "request", iris, **opts),
            kserve_event(k + "b", "response", v2_probs_body([c, (c + 1) % N_CLASSES]), **opts),
            kserve_event(k + "b", "response", v2_probs_body([c, (c + 1) % N_CLASSES]), **opts),
        )
        ex.stored[src] += 2
        ex.dropped[(src, "no_image")] += 2
        ex.groups[(src, "endpoint", endpoint)] += 2
        ex.joined[src] += 1
        ex.duplicates[src] += 1
        # 3. v2 bytes sample (shape -1, base64 string) + a UINT8 label in the binary tail
        label = (9, 10, 11, 12, 13, 32)[r % 6]  # whitespace bytes
        octet = {**opts, "content_type": "application/octet-stream"}
        unit(
            kserve_event(k + "c", "response", uint8_label_response([label]), **octet),
            kserve_event(k + "c", "request", mnist_v2, **opts),
        )
        ex.stored[src] += 1
        ex.with_input[src] += 1
        ex.groups[(src, "endpoint", endpoint)] += 1
        ex.joined[src] += 1
        # 4. Triton binary extension both ways (PNG BYTES in, FP32 out), every fourth round
        if r % 4 == 0:
            req, _ = cp.binary_request([cp.PNG, cp.PNG])
            unit(
                kserve_event(k + "d", "request", req, **octet),
                kserve_event(k + "d", "response", binary_fp32_response([c, 1]), **octet),
            )
            ex.stored[src] += 2
            ex.with_input[src] += 2
            ex.groups[(src, "endpoint", endpoint)] += 2
            ex.joined[src] += 1
        # 5. only the input is unusable: bad base64, not an image -> prediction kept
        bad = instances_body([{"image_bytes": {"b64": "!!not base64!!"}}, {"data": _b64(b"hello")}])
        unit(
            kserve_event(k + "e", "request", bad, **opts),
            kserve_event(k + "e", "response", v1_prediction_body([c, c]), **opts),
        )
        ex.stored[src] += 2
        ex.dropped[(src, "not_base64")] += 1
        ex.dropped[(src, "not_image")] += 1
        ex.groups[(src, "endpoint", endpoint)] += 2
        ex.joined[src] += 1
        # 6. a lone response (its request lost: still an event), a lone request, a bad body
        if r % 5 == 0:
            unit(kserve_event(k + "f", "response", v1_prediction_body([c]), **opts))
            unit(kserve_event(k + "g", "request", mnist, **opts))
            unit(kserve_event(k + "h", "response", b"{not json", **opts))
            ex.stored[src] += 1
            ex.groups[(src, "endpoint", endpoint)] += 1
            ex.orphans[(src, "response")] += 1
            ex.orphans[(src, "request")] += 1
            ex.rejected[(src, "bad_json")] += 1
    return Replay(units, ex)


def seldon_replay(rounds: int, tag: str) -> Replay:
    """Seldon Core v1: transformer + model graphs with loggers on both nodes, gzip bodies,
    feedback, two predictors, binary and structured mode."""
    path, src = "/v1/sources/seldon", "seldon"
    ex, units = Expected(), []
    for r in range(rounds):
        rid, c = f"{tag}s{r}", r % N_CLASSES
        predictor = "main" if r % 3 else "shadow"
        classes = [c] if r % 2 else [c, (c + 5) % N_CLASSES]
        unit = [
            (path, h, b)
            for h, b in seldon_graph(rid, classes, predictor=predictor, structured=r % 4 == 1)
        ]
        ex.events += len(unit)
        ex.ignored[(src, "other_node")] += 4
        ex.stored[src] += len(classes)
        ex.groups[(src, "site", "A")] += len(classes)
        ex.groups[(src, "endpoint", predictor)] += len(classes)
        ex.dropped[(src, "no_image")] += len(classes)
        ex.joined[src] += 1
        if r % 3 == 0:  # feedback on the model node
            fb = json.dumps({"request": {}, "response": {}, "reward": 1}).encode()
            unit.append((path, *seldon_event(rid, "feedback", fb)))
            ex.events += 1
            ex.ignored[(src, "event_type")] += 1
        units.append(unit)
        if r % 5 == 0:  # Triton behind Seldon: gzip response, no Content-Encoding; a bad gzip
            g = f"{tag}g{r}"
            body = gzip.compress(seldon_probs([c]))
            units.append(
                [
                    (path, *seldon_event(g, "response", body, predictor=predictor)),
                    (path, *seldon_event(g, "request", seldon_features(1), predictor=predictor)),
                ]
            )
            bad_h, _ = seldon_event(g + "x", "response", b"")
            units.append([(path, {**bad_h, "content-encoding": "gzip"}, b"not gzip")])
            ex.events += 3
            ex.stored[src] += 1
            ex.groups[(src, "endpoint", predictor)] += 1
            ex.dropped[(src, "no_image")] += 1
            ex.joined[src] += 1
            ex.rejected[(src, "bad_gzip")] += 1
    return Replay(units, ex)


# one generator per integration: (events per round, generator); add BentoML / TorchServe here
GENERATORS: dict[str, Generator] = {"kserve": kserve_replay, "seldon": seldon_replay}


def replay(rounds: dict[str, int], tag: str) -> Replay:
    """The units of every integration in ``rounds`` and the sum of their expected counts."""
    units: list[list[Post]] = []
    expected = Expected()
    for name, n in rounds.items():
        part = GENERATORS[name](n, tag)
        units.extend(part.units)
        expected.add(part.expected)
    return Replay(units, expected)


def serve_overrides(redis_url: str, roots: list[Path], **sources: Any) -> dict[str, Any]:
    """A serve config for these events: the 40-class model ``skin``, groups site and endpoint."""
    return {
        "redis": {"url": redis_url, "embedded": "never"},
        "model": {"name": "skin", "class_names": CLASS_NAMES},
        "groups": {"attributes": ["site", "endpoint"]},
        "sources": {"allowed_roots": [str(r) for r in roots], **sources},
    }

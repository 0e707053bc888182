"""Real-format logger payloads for the capture tests (KServe, Seldon, OIP binary, BentoML).

Shapes follow the servers' own code and docs: KServe ``pkg/logger`` (binary CloudEvents,
``ce-metadata`` as JSON of header lists), Seldon Core v1 executor logger (``ce-requestid``,
gzip bodies), Triton's binary tensor extension, BentoML monitoring data logs.
"""

from __future__ import annotations

import gzip
import json
import struct
from typing import Any

PNG = (  # a 1x1 red PNG that decodes (serve decodes inline inputs before storing them)
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00"
    b"\x1f\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xcf\xc0\xf0\x1f\x00\x05\x00\x01\xff\x89\x99=\x1d"
    b"\x00\x00\x00\x00IEND\xaeB`\x82"
)


def kserve_headers(
    ce_id: str,
    half: str,
    *,
    isvc: str = "skin",
    metadata: dict[str, list[str]] | None = None,
    content_type: str = "application/json",
) -> dict[str, str]:
    """Headers exactly as KServe's logger agent sends them (binary-mode CloudEvent)."""
    return {
        "ce-specversion": "1.0",
        "ce-id": ce_id,
        "ce-type": f"org.kubeflow.serving.inference.{half}",
        "ce-source": "http://localhost:9081/",
        "ce-time": "2026-11-23T10:00:00Z",
        "ce-inferenceservicename": isvc,
        "ce-namespace": "default",
        "ce-component": "predictor",
        "ce-endpoint": "default",
        "ce-metadata": json.dumps(metadata or {}),
        "content-type": content_type,
    }


def v1_request(n: int) -> bytes:
    return json.dumps({"instances": [[[0.0] * 4] * 4] * n}).encode()


def v1_response(probs: list[list[float]]) -> bytes:
    return json.dumps({"predictions": probs}).encode()


def v2_response(probs: list[list[float]], version: str | None = "7") -> bytes:
    flat = [p for row in probs for p in row]
    body: dict[str, Any] = {
        "model_name": "skin",
        "id": "x",
        "outputs": [
            {
                "name": "probs",
                "shape": [len(probs), len(probs[0])],
                "datatype": "FP32",
                "data": flat,
            }
        ],
    }
    if version:
        body["model_version"] = version
    return json.dumps(body).encode()


def v2_request_json(n: int) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "x", "shape": [n, 4], "datatype": "FP32", "data": [0.5] * (4 * n)}]}
    ).encode()


def binary_request(images: list[bytes]) -> tuple[bytes, int]:
    """An OIP request with a BYTES tensor in Triton's binary extension; (body, header length)."""
    raw = b"".join(struct.pack("<I", len(im)) + im for im in images)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [len(images)],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return header + raw, len(header)


def binary_response(probs: list[list[float]]) -> tuple[bytes, int]:
    flat = [p for row in probs for p in row]
    raw = struct.pack(f"<{len(flat)}f", *flat)
    header = json.dumps(
        {
            "model_name": "skin",
            "model_version": "3",
            "outputs": [
                {
                    "name": "probs",
                    "shape": [len(probs), len(probs[0])],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    ).encode()
    return header + raw, len(header)


def seldon_headers(
    event_id: str, request_id: str, half: str, *, gzip_body: bool = False
) -> dict[str, str]:
    """Headers as the Seldon Core v1 executor's request logger sends them."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-type": f"io.seldon.serving.inference.{half}",
        "ce-source": "http://:8000/",
        "ce-time": "2026-11-23T10:00:05Z",
        "ce-requestid": request_id,
        "ce-modelid": "classifier",
        "ce-inferenceservicename": "skin",
        "ce-namespace": "seldon",
        "ce-endpoint": "default",
        "content-type": "application/json",
    }
    if gzip_body:
        headers["content-encoding"] = "gzip"
    return headers


def seldon_request(n: int, site: str) -> bytes:
    return json.dumps(
        {
            "data": {"names": ["a", "b"], "ndarray": [[0.1, 0.2]] * n},
            "meta": {"tags": {"x-patchd-group-site": site}},
        }
    ).encode()


def seldon_response(probs: list[list[float]], site: str, gz: bool) -> bytes:
    body = json.dumps(
        {
            "data": {"names": ["t:0", "t:1"], "ndarray": probs},
            "meta": {
                "tags": {"x-patchd-group-site": site},
                "requestPath": {"classifier": "skin:1.2"},
            },
        }
    ).encode()
    return gzip.compress(body) if gz else body


def bentoml_line(request_id: int, pred: int, probs: list[float], site: str, uri: str | None) -> str:
    row: dict[str, Any] = {"pred": pred, "probs": probs, "site": site, "caption": "a photo"}
    if uri:
        row["input_uri"] = uri
    row.update(timestamp="2026-11-23T10:00:00.123456", request_id=request_id)
    return json.dumps(row)

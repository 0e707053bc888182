"""Seldon Core v1 request logger → patchd: ``POST /v1/sources/seldon``.

Point the SeldonDeployment's graph logger at patchd::

    graph:
      name: classifier
      logger: {mode: all, url: "http://patchd.monitoring:8321/v1/sources/seldon?token=<ingest>"}

The executor sends binary-mode CloudEvents ``io.seldon.serving.inference.request|response``
with ``Ce-Requestid`` (``ce-id`` differs per event), ``Ce-Modelid`` (graph node),
``Ce-Inferenceservicename`` (the SeldonDeployment), ``Ce-Endpoint`` (the predictor) and
``Ce-Protocol`` (``seldon``, ``tensorflow`` or ``kfserving``/``v2``). Every node with a logger
logs its own request and response under the same ``Ce-Requestid``, so halves are joined by
request id within one node and predictor. The node whose output is the classifier's is
``sources.seldon.node`` (default: the node named like the model once one has logged); the other
nodes' events, and ``io.seldon.serving.feedback`` events, are answered 200 and counted as
ignored. Bodies may be gzip (Triton responses) and are gunzipped.
Decoded bodies: SeldonMessage (``data.ndarray``, ``data.tensor``, ``binData``, ``strData``,
``jsonData``), TF-serving JSON (``instances``/``predictions``) and OIP v2.
Subgroups come from ``meta.tags`` (``x-patchd-group-<attr>`` tags and ``group_headers`` names)
and the model version from ``meta.requestPath[<modelid>]`` (the container image).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from patchd.exceptions import ValidationError
from patchd.plugins.sources.cloudevents import (
    CloudEvent,
    CloudEventSource,
    Part,
    RequestPart,
    ResponsePart,
    stream_key,
)
from patchd.plugins.sources.join import Half
from patchd.plugins.sources.kserve import request_inputs, response_predictions
from patchd.plugins.sources.payloads import (
    INLINE_OFF,
    NO_IMAGE,
    InputRef,
    Prediction,
    load_json,
    prediction_from_value,
    v1_inputs,
    v1_predictions,
)
from patchd.services import Services

if TYPE_CHECKING:
    from patchd.config import SeldonSourceConfig

REQUEST = "io.seldon.serving.inference.request"
RESPONSE = "io.seldon.serving.inference.response"
FEEDBACK = "io.seldon.serving.feedback"


class SeldonComponent(CloudEventSource):
    name = "seldon"
    source = "seldon"
    path = "/v1/sources/seldon"
    request_types = frozenset({REQUEST, "org.kubeflow.serving.inference.request"})
    response_types = frozenset({RESPONSE, "org.kubeflow.serving.inference.response"})
    ignored_types = frozenset({FEEDBACK})

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.seldon: SeldonSourceConfig = services.config.sources.seldon
        self._model_node_seen = False

    def join_key(self, event: CloudEvent) -> str:
        ident = event.attr("requestid") or event.id
        return stream_key(ident, event.attr("endpoint"), event.attr("modelid"))

    def skip_reason(self, event: CloudEvent) -> str | None:
        node = event.attr("modelid")
        if self.seldon.node is not None:
            if node != self.seldon.node:
                return "other_node"
        elif node and node == (self.settings.model or self.model):
            self._model_node_seen = True
        elif node and self._model_node_seen:
            return "other_node"
        return super().skip_reason(event)

    def decode(self, event: CloudEvent, half: Half) -> Part:
        model = self._served_model(event)
        ts = event.attr("time")
        if _is_oip_event(event):
            return self._decode_oip(event, half, model, ts)
        body = load_json(event.data, "Seldon")
        if not isinstance(body, dict):
            raise ValidationError("unsupported_body", "Seldon body must be a JSON object")
        meta = body.get("meta")
        if not isinstance(meta, dict):
            meta = {}
        groups = {**self.header_groups(meta.get("tags") or {}), **self.stream_groups(event)}
        if half == "request":
            inputs = seldon_inputs(body, self.settings.inline_inputs)
            tagged = self.header_inputs(meta.get("tags") or {}, len(inputs))
            return RequestPart(model, ts, tagged or inputs, groups)
        preds = seldon_predictions(body, self.class_names)
        version = _version(meta, event.attr("modelid"))
        tagged = self.header_inputs(meta.get("tags") or {}, len(preds))
        return ResponsePart(model, ts, tuple(preds), version, groups, tagged)

    def _decode_oip(self, event: CloudEvent, half: Half, model: str | None, ts: str | None) -> Part:
        groups = self.stream_groups(event)
        if half == "request":
            inputs = request_inputs(event, self.settings.inline_inputs)
            return RequestPart(model, ts, inputs, groups)
        preds, version = response_predictions(event, self.class_names, self.settings.output)
        return ResponsePart(model, ts, tuple(preds), version, groups)

    def _served_model(self, event: CloudEvent) -> str | None:
        expected = self.settings.model or self.model
        node = event.attr("modelid")
        if node == expected or (node and node == self.seldon.node):
            return expected  # the configured model node is the model, whatever it is named
        return event.attr("inferenceservicename") or node


def _is_oip(event: CloudEvent) -> bool:
    return (event.attr("protocol") or "").lower() in ("kfserving", "v2", "oip")


def _is_oip_event(event: CloudEvent) -> bool:
    if _is_oip(event):
        return True
    head = event.data[:4096]
    return b'"datatype"' in head and (b'"outputs"' in head or b'"inputs"' in head)


def _version(meta: Mapping[str, Any], modelid: str | None) -> str | None:
    path = meta.get("requestPath")
    if isinstance(path, dict) and modelid and isinstance(path.get(modelid), str):
        return str(path[modelid])[:128]
    return None


def _data_rows(data: Mapping[str, Any]) -> list[Any]:
    """``data.ndarray`` rows, or ``data.tensor`` values split along the first axis."""
    if isinstance(data.get("ndarray"), list):
        return list(data["ndarray"])
    tensor = data.get("tensor")
    if isinstance(tensor, dict) and isinstance(tensor.get("values"), list):
        shape = tensor.get("shape") or [1, len(tensor["values"])]
        values: Sequence[Any] = tensor["values"]
        n = int(shape[0]) if isinstance(shape, list) and shape else 1
        if n <= 0 or n > max(1, len(values)) or len(values) % n:  # n rows need n values
            raise ValidationError("shape_mismatch", f"tensor shape {shape} vs {len(values)} values")
        width = len(values) // n
        return [list(values[i * width : (i + 1) * width]) for i in range(n)]
    raise ValidationError("unsupported_body", "SeldonMessage data has neither ndarray nor tensor")


def seldon_inputs(body: Mapping[str, Any], inline: bool) -> tuple[InputRef | None, ...]:
    """Per-instance inputs of a SeldonMessage or TF-serving request."""
    if "instances" in body:
        return tuple(v1_inputs(body, inline))
    if isinstance(body.get("data"), dict):
        return (InputRef(dropped=NO_IMAGE),) * len(_data_rows(body["data"]))
    if isinstance(body.get("binData"), str):
        try:
            raw = base64.b64decode(body["binData"], validate=True)
        except ValueError:
            raise ValidationError("unsupported_body", "binData is not base64") from None
        return (InputRef(data=raw) if inline else InputRef(dropped=INLINE_OFF),)
    if isinstance(body.get("strData"), str):
        text = body["strData"]
        uri = "://" in text or text.startswith("/")
        return (InputRef(uri=text) if uri else InputRef(dropped=NO_IMAGE),)
    if isinstance(body.get("jsonData"), dict) and "instances" in body["jsonData"]:
        return tuple(v1_inputs(body["jsonData"], inline))
    if "jsonData" in body:
        return (InputRef(dropped=NO_IMAGE),)
    raise ValidationError(
        "unsupported_body", "request has none of data, binData, strData, jsonData, instances"
    )


def seldon_predictions(body: Mapping[str, Any], class_names: tuple[str, ...]) -> list[Prediction]:
    """Per-instance predictions of a SeldonMessage or TF-serving response."""
    if "predictions" in body:
        return v1_predictions(body, class_names)
    if isinstance(body.get("data"), dict):
        return [prediction_from_value(row, class_names) for row in _data_rows(body["data"])]
    json_data = body.get("jsonData")
    if isinstance(json_data, dict) and "predictions" in json_data:
        return v1_predictions(json_data, class_names)
    if json_data is not None:
        return [prediction_from_value(json_data, class_names)]
    if isinstance(body.get("strData"), str):
        return [prediction_from_value(body["strData"], class_names)]
    raise ValidationError("unsupported_body", "response has none of data, jsonData, predictions")

"""KServe inference logger → patchd: ``POST /v1/sources/kserve``.

Point the InferenceService's logger at patchd::

    spec:
      predictor:
        logger:
          mode: all
          url: http://patchd.monitoring:8321/v1/sources/kserve?token=<ingest token>
          metadataHeaders: ["X-Patchd-Group-Site", "X-Patchd-Input-Uri"]

``metadataHeaders`` must be written in Go's canonical form (the agent compares them, exactly, with
the canonicalised names of the incoming headers); patchd reads ``ce-metadata`` case-insensitively.
Each request and response arrives as a binary-mode CloudEvent (``ce-type``
``org.kubeflow.serving.inference.request|response``, the same ``ce-id`` on both,
``ce-inferenceservicename``, ``ce-component``, ``ce-endpoint``, ``ce-metadata`` = JSON of the
forwarded headers, e.g. ``{"X-Patchd-Group-Site": ["B"]}``). Halves are joined by ``ce-id`` within
one stream (``ce-component`` and ``ce-endpoint``) within ``sources.kserve.ttl_s``. Only the
``sources.kserve.component`` stream (default ``predictor``) becomes events; the endpoint
(default/canary) is recorded as the group attribute ``sources.kserve.endpoint_group``. The body is
KServe v1 (``instances`` / ``predictions``) or Open Inference Protocol v2 JSON, with or without
Triton's binary tensor extension. A pair with N instances becomes N events, ids ``<ce-id>`` when
N = 1 and ``<ce-id>-<i>`` otherwise. KServe logs the response only on HTTP 200, so a request
without response is an orphan that is counted and dropped; a response without request still
becomes events (no input).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from patchd.exceptions import ValidationError
from patchd.plugins.sources.cloudevents import (
    CloudEvent,
    CloudEventSource,
    Part,
    RequestPart,
    ResponsePart,
    header_json,
    stream_key,
)
from patchd.plugins.sources.join import Half
from patchd.plugins.sources.payloads import (
    InputRef,
    Prediction,
    is_blank,
    is_oip,
    oip_inputs,
    parse_oip_tensors,
    predictions_from_outputs,
    split_binary,
    v1_inputs,
    v1_predictions,
)
from patchd.services import Services

if TYPE_CHECKING:
    from patchd.config import KServeSourceConfig

log = logging.getLogger(__name__)

REQUEST = "org.kubeflow.serving.inference.request"
RESPONSE = "org.kubeflow.serving.inference.response"
HEADER_LENGTH = "inference-header-content-length"


class KServeComponent(CloudEventSource):
    name = "kserve"
    source = "kserve"
    path = "/v1/sources/kserve"
    request_types = frozenset({REQUEST})
    response_types = frozenset({RESPONSE})

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.kserve: KServeSourceConfig = services.config.sources.kserve
        self._hint_metadata = bool(services.config.groups.attributes)

    def join_key(self, event: CloudEvent) -> str:
        return stream_key(event.id, event.attr("component"), event.attr("endpoint"))

    def skip_reason(self, event: CloudEvent) -> str | None:
        component = event.attr("component")
        if component and component != self.kserve.component:
            return "other_component"
        return super().skip_reason(event)

    def decode(self, event: CloudEvent, half: Half) -> Part:
        metadata = header_json(event.attr("metadata"))
        if not metadata and self._hint_metadata:
            self._hint_metadata = False  # once: groups.attributes are wanted but none forwarded
            log.info(
                "kserve: events carry no forwarded headers (ce-metadata is empty); list them in "
                "the logger's metadataHeaders in Go's canonical form, e.g. X-Patchd-Group-Site"
            )
        groups = {**self.header_groups(metadata), **self.stream_groups(event)}
        model = event.attr("inferenceservicename")
        ts = event.attr("time")
        if half == "request":
            inputs = request_inputs(event, self.settings.inline_inputs)
            from_headers = self.header_inputs(metadata, len(inputs))
            return RequestPart(model, ts, from_headers or inputs, groups)
        preds, version = response_predictions(event, self.class_names, self.settings.output)
        return ResponsePart(
            model, ts, tuple(preds), version, groups, self.header_inputs(metadata, len(preds))
        )


def _header_length(event: CloudEvent) -> int | None:
    raw = event.attr(HEADER_LENGTH.replace("-", ""))  # forwarded as a ce extension, if at all
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValidationError("binary_header", f"bad {HEADER_LENGTH} {raw!r}") from None


def _body(event: CloudEvent) -> tuple[dict[str, Any], bytes]:
    if not event.data:
        raise ValidationError("unsupported_body", f"event {event.id} has an empty body")
    return split_binary(event.data, _header_length(event))


def request_inputs(event: CloudEvent, inline: bool) -> tuple[InputRef | None, ...]:
    """Per-instance inputs of a v1 or v2 request body."""
    body, tail = _body(event)
    if is_oip(body):
        return tuple(oip_inputs(parse_oip_tensors(body, "inputs", tail), inline))
    if not is_blank(tail):
        raise ValidationError("unsupported_body", "binary data after a non-OIP JSON body")
    return tuple(v1_inputs(body, inline))


def response_predictions(
    event: CloudEvent, class_names: tuple[str, ...], output: str | None
) -> tuple[list[Prediction], str | None]:
    """Per-instance predictions of a v1 or v2 response body, and the v2 ``model_version``."""
    body, tail = _body(event)
    if is_oip(body):
        outputs = parse_oip_tensors(body, "outputs", tail)
        version = body.get("model_version")
        return predictions_from_outputs(outputs, class_names, output), (
            str(version) if version not in (None, "") else None
        )
    if not is_blank(tail):
        raise ValidationError("unsupported_body", "binary data after a non-OIP JSON body")
    return v1_predictions(body, class_names), None

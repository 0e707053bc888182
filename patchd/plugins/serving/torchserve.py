"""TorchServe handler mixin: log each request's prediction to patchd from inside the handler.

TorchServe's own logs hold no payloads (only access lines), so the handler is the place to
capture. Put the mixin first in the bases::

    from ts.torch_handler.image_classifier import ImageClassifier
    from patchd.plugins.serving.torchserve import PatchdHandlerMixin

    class Handler(PatchdHandlerMixin, ImageClassifier):
        pass

Configuration comes from the environment of the TorchServe process, read in ``initialize``
(never at import): ``PATCHD_URL`` (unset: logging is off), ``PATCHD_TOKEN`` (an ingest token),
``PATCHD_MODEL`` (default: the TorchServe model name). Per request in a batch the event id is
TorchServe's request id (``context.get_request_id(i)``), groups come from
``x-patchd-group-<attr>`` request headers, the input URI from ``x-patchd-input-uri``.
Predictions are read from the handler's output by :meth:`patchd_extract` (override it): a class
index, a list of scores, a ``{"pred", "probs"}`` dict, or TorchServe's top-k
``{class_name: probability}`` dict (the name with the highest probability is the prediction;
probabilities are not sent because top-k is not the full distribution).
Nothing here imports torchserve or torch; a failure to log never fails the request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from patchd.plugins.serving.client import PatchdLogger

log = logging.getLogger(__name__)
GROUP_PREFIX = "x-patchd-group-"


class PatchdHandlerMixin:
    """Adds patchd logging around a TorchServe handler's ``handle``."""

    patchd_logger: PatchdLogger | None = None
    patchd_model: str | None = None
    patchd_group_headers: tuple[str, ...] = ()  # attribute names read from x-patchd-group-<attr>

    def initialize(self, context: Any) -> None:
        super().initialize(context)  # type: ignore[misc]
        url = os.environ.get("PATCHD_URL")
        if url and self.patchd_logger is None:
            self.patchd_logger = PatchdLogger(url, token=os.environ.get("PATCHD_TOKEN"))
        self.patchd_model = os.environ.get("PATCHD_MODEL") or getattr(context, "model_name", None)

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        outputs = super().handle(data, context)  # type: ignore[misc]
        if self.patchd_logger is not None:
            try:
                self._patchd_log(outputs, context)
            except Exception:  # logging must never fail inference
                log.exception("patchd: could not log a batch")
        return outputs

    def _patchd_log(self, outputs: list[Any], context: Any) -> None:
        logger = self.patchd_logger
        if logger is None:
            return
        for i, output in enumerate(outputs):
            event = dict(self.patchd_extract(output))
            event["id"] = _request_id(context, i)
            if self.patchd_model:
                event["model"] = self.patchd_model
            groups, uri = _headers(context, i, self.patchd_group_headers)
            if groups:
                event["groups"] = groups
            if uri:
                event["input"] = {"uri": uri}
            logger.log(event)

    def patchd_extract(self, output: Any) -> Mapping[str, Any]:
        """One request's handler output → ``{"pred": ..., "probs"?: [...]}``."""
        if isinstance(output, Mapping) and "pred" in output:
            return {k: output[k] for k in ("pred", "probs") if k in output}
        if isinstance(output, Mapping) and output:
            return {"pred": max(output, key=lambda k: output[k])}
        if isinstance(output, list) and output and all(isinstance(v, float) for v in output):
            return {"pred": max(range(len(output)), key=output.__getitem__), "probs": output}
        return {"pred": output}


def _request_id(context: Any, i: int) -> str:
    getter = getattr(context, "get_request_id", None)
    if callable(getter):
        found = getter(i)
        if found:
            return str(found)
    ids = getattr(context, "request_ids", None) or {}
    return str(ids.get(i, f"ts-{id(context)}-{i}"))


def _headers(context: Any, i: int, attrs: tuple[str, ...]) -> tuple[dict[str, str], str | None]:
    getter = getattr(context, "get_request_header", None)
    if not callable(getter):
        return {}, None
    groups = {}
    for attr in attrs:
        value = getter(i, GROUP_PREFIX + attr)
        if value:
            groups[attr] = str(value)
    uri = getter(i, "x-patchd-input-uri")
    return groups, str(uri) if uri else None

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
``x-patchd-group-<attr>`` request headers, the input URI from ``x-patchd-input-uri``. Header
names are matched case-insensitively: TorchServe hands the handler each header under the name
the client sent (``X-Patchd-Group-Site``), in one dict with the request's parameter names
(``ts/service.py``, ``retrieve_data_for_inference``), so only string values are headers.
Predictions are read from the handler's output by :meth:`patchd_extract` (override it): a class
index, a list of scores, a ``{"pred", "probs"}`` dict, or TorchServe's top-k
``{class_name: probability}`` dict (the name with the highest probability is the prediction;
probabilities are not sent because top-k is not the full distribution). Without
``index_to_name.json`` those names are ``"0".."N-1"`` (``ts/utils/util.py``,
``map_class_to_label``); serve reads a decimal string that is not a class name as the index.
An input URI that is not a local path or ``file:`` URI (``s3://...``) is not sent (serve
would reject the whole event) and counted in ``patchd_inputs_dropped``. Not logged: ``describe``
and ``explain`` requests (their output is no prediction) and requests
the handler marked with a non-2xx status (``context.set_response_status``).
Nothing here imports torchserve or torch; a failure to log never fails the request.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from patchd.plugins.serving.client import PatchdLogger

log = logging.getLogger(__name__)
GROUP_PREFIX = "x-patchd-group-"
INPUT_HEADER = "x-patchd-input-uri"


class PatchdHandlerMixin:
    """Adds patchd logging around a TorchServe handler's ``handle``."""

    patchd_logger: PatchdLogger | None = None
    patchd_model: str | None = None
    patchd_group_headers: tuple[str, ...] = ()  # attribute names read from x-patchd-group-<attr>
    patchd_inputs_dropped: Counter[str] | None = None  # reason -> inputs not sent (not local)

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
        if logger is None or _not_inference(context):
            return
        for i, output in enumerate(outputs):
            if not _succeeded(context, i):
                continue
            event = dict(self.patchd_extract(output))
            event["id"] = _request_id(context, i)
            if self.patchd_model:
                event["model"] = self.patchd_model
            groups, uri = _headers(context, i, self.patchd_group_headers)
            if groups:
                event["groups"] = groups
            if uri and _local(uri):
                event["input"] = {"uri": uri}
            elif uri:  # serve would reject the whole event for it: keep the prediction
                self.patchd_inputs_dropped = self.patchd_inputs_dropped or Counter()
                self.patchd_inputs_dropped["not_local"] += 1
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


def request_headers(context: Any, i: int, names: tuple[str, ...]) -> dict[str, str]:
    """Request ``i``'s headers with lower-case names (string values only: TorchServe keeps the
    request's parameters, ``{"content-type": ...}`` dicts, in the same mapping). ``names``
    (lower-case) are asked for one by one when the context cannot list its headers."""
    getter = getattr(context, "get_all_request_header", None)
    found = getter(i) if callable(getter) else None
    if not isinstance(found, Mapping):
        return _named_headers(context, i, names)
    return {str(k).lower(): v for k, v in found.items() if isinstance(v, str)}


def _named_headers(context: Any, i: int, names: tuple[str, ...]) -> dict[str, str]:
    getter = getattr(context, "get_request_header", None)
    if not callable(getter):
        return {}
    return {n: v for n in names if isinstance(v := getter(i, n), str)}


def _headers(context: Any, i: int, attrs: tuple[str, ...]) -> tuple[dict[str, str], str | None]:
    names = (*(GROUP_PREFIX + a.lower() for a in attrs), INPUT_HEADER)
    headers = request_headers(context, i, names)
    groups = {}
    for attr in attrs:
        value = headers.get(GROUP_PREFIX + attr.lower())
        if value:
            groups[attr] = value
    return groups, headers.get(INPUT_HEADER) or None


def _local(uri: str) -> bool:
    """A path or ``file:`` URI (serve checks it against ``sources.allowed_roots``)."""
    return uri.startswith(("/", "file:"))


def _not_inference(context: Any) -> bool:
    """A describe or explain request (TorchServe sets these headers on request 0)."""
    headers = request_headers(context, 0, ("describe", "explain"))
    return headers.get("describe") == "True" or headers.get("explain") == "True"


def _succeeded(context: Any, i: int) -> bool:
    getter = getattr(context, "get_response_status", None)
    if not callable(getter):
        return True
    try:
        code = int(getter(i)[0])
    except (TypeError, ValueError, IndexError, KeyError):
        return True
    return 200 <= code < 300

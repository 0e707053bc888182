"""CloudEvents in, schema-v1 prediction events out: the machinery KServe and Seldon share.

:func:`parse_cloudevent` reads an event in binary mode (``ce-*`` headers, raw body) or structured
mode (``application/cloudevents+json``), gunzipping the body when it is gzip.
:class:`CloudEventSource` is the serve Component: one ``POST`` route, a request/response
:class:`~patchd.plugins.sources.join.PairJoiner`, a periodic sweep that expires orphans, and the
``patchd_capture_*`` metrics (one collector shared by every CloudEvents source, label ``source``).
An event refused before it is joined (``bad_json``, ``binary_truncated``, ``bad_gzip``, ...) is
counted in ``patchd_capture_rejected_total`` and in ``patchd_ingest_rejected_total`` (same
``source`` and ``reason``); the events of a joined pair that ingest refuses are counted by ingest
alone. Subclasses say how to decode a half and how a joined pair becomes events.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import logging
import zlib
from abc import abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

# Request and Response are resolved at run time by FastAPI (the route's signature, /openapi.json)
from fastapi import Request, Response

from patchd.exceptions import PatchdError, QueueFullError, ValidationError
from patchd.plugins.sources.join import Half, Joined, PairJoiner
from patchd.plugins.sources.payloads import IMAGE_MAGIC, InputRef, Prediction
from patchd.services import Component, Services

if TYPE_CHECKING:
    from fastapi import APIRouter
    from prometheus_client.registry import Collector

    from patchd.config import CloudEventSourceConfig

log = logging.getLogger(__name__)

MAX_DECOMPRESSED = 64 << 20
STATS_KEY = "capture_stats"


@dataclass(frozen=True)
class CloudEvent:
    id: str
    type: str
    attrs: Mapping[str, str]  # every other context attribute / extension, lower-case, no prefix
    content_type: str
    data: bytes

    def attr(self, name: str) -> str | None:
        return self.attrs.get(name)


def parse_cloudevent(
    headers: Mapping[str, str], body: bytes, max_bytes: int = MAX_DECOMPRESSED
) -> CloudEvent:
    """Binary-mode headers + body, or a structured-mode JSON envelope → :class:`CloudEvent`.

    A gzip body inflates to at most ``max_bytes`` (streaming, never more in memory).
    """
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = lower.get("content-type", "")
    if content_type.startswith("application/cloudevents-batch"):
        raise ValidationError("unsupported_body", "batched CloudEvents are not supported")
    if content_type.startswith("application/cloudevents"):
        return _structured(body, max_bytes)
    attrs = {k[3:]: v for k, v in lower.items() if k.startswith("ce-")}
    if "inference-header-content-length" in lower:  # OIP binary extension, kept by a tee proxy
        attrs.setdefault("inferenceheadercontentlength", lower["inference-header-content-length"])
    gzipped = lower.get("content-encoding", "").lower() == "gzip"
    data = gunzip(body, max_bytes) if gzipped else body
    return _event(attrs, content_type, data, max_bytes)


def _structured(body: bytes, max_bytes: int) -> CloudEvent:
    try:
        env = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # deep, huge ints
        message = f"structured CloudEvent is not JSON we read: {str(err)[:200]}"
        raise ValidationError("bad_json", message) from None
    if not isinstance(env, dict):
        raise ValidationError("bad_cloudevent", "structured CloudEvent must be a JSON object")
    if "data_base64" in env:
        encoded = env.pop("data_base64")
        if not isinstance(encoded, str):
            raise ValidationError("bad_cloudevent", "data_base64 must be a string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise ValidationError("bad_cloudevent", "data_base64 is not valid base64") from None
    else:
        raw = env.pop("data", None)
        data = raw.encode() if isinstance(raw, str) else json.dumps(raw).encode()
    content_type = str(env.pop("datacontenttype", "application/json"))
    attrs = {str(k).lower(): v if isinstance(v, str) else json.dumps(v) for k, v in env.items()}
    return _event(attrs, content_type, data, max_bytes)


def _event(
    attrs: dict[str, str], content_type: str, data: bytes, max_bytes: int = MAX_DECOMPRESSED
) -> CloudEvent:
    ident, kind = attrs.pop("id", ""), attrs.pop("type", "")
    if not ident or not kind:
        raise ValidationError(
            "bad_cloudevent", "missing ce-id or ce-type: is the logger sending binary CloudEvents?"
        )
    if data[:2] == b"\x1f\x8b":
        data = gunzip(data, max_bytes)  # Seldon forwards gzip bodies (Triton) unannounced
    return CloudEvent(ident, kind, attrs, content_type, data)


def gunzip(data: bytes, max_bytes: int = MAX_DECOMPRESSED) -> bytes:
    """Decompress a gzip body, refusing more than ``max_bytes`` of output (gzip bombs).

    Streaming: zlib never produces more than ``max_bytes + 1`` bytes, whatever the ratio.
    """
    try:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflater.decompress(data, max_bytes + 1)
        if len(out) <= max_bytes and not inflater.unconsumed_tail:
            out += inflater.flush()  # all input consumed below the cap: only zlib's remainder
    except (zlib.error, gzip.BadGzipFile) as err:
        raise ValidationError("bad_gzip", f"body is not valid gzip: {err}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        message = f"gzip body inflates past {max_bytes} bytes (max_decompressed_bytes)"
        raise ValidationError("too_large", message)
    return out


def header_json(value: str | None) -> dict[str, Any]:
    """A JSON-object header (``ce-metadata``, ``ce-annotations``); garbage → ``{}``."""
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


# --------------------------------------------------------------------------- halves and metrics


@dataclass(frozen=True)
class RequestPart:
    """The decoded request half of a pair."""

    model: str | None
    ts: str | None
    inputs: tuple[InputRef | None, ...]
    groups: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ResponsePart:
    model: str | None
    ts: str | None
    predictions: tuple[Prediction, ...]
    model_version: str | None = None
    groups: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[InputRef | None, ...] = ()  # input URIs known from headers


Part = RequestPart | ResponsePart


HALF_OVERHEAD = 1024  # a buffered half: the key, the dataclass, the joiner's entry
INSTANCE_OVERHEAD = 200  # per prediction or input reference (objects, tuple slots)


def part_size(part: Part) -> int:
    """Estimated bytes a buffered half holds: inline inputs, instances, probabilities."""
    size = HALF_OVERHEAD + INSTANCE_OVERHEAD * len(part.inputs)
    size += sum(len(ref.data or b"") + len(ref.uri or "") for ref in part.inputs if ref)
    if isinstance(part, ResponsePart):
        size += sum(INSTANCE_OVERHEAD + 32 * len(p.probs or ()) for p in part.predictions)
    return size


def instances(part: Part) -> int:
    return len(part.predictions) if isinstance(part, ResponsePart) else len(part.inputs)


class CaptureStats:
    """Counters of every CloudEvents source, exported by one collector (label ``source``)."""

    def __init__(self) -> None:
        self.joiners: dict[str, PairJoiner[Part]] = {}
        self.received: Counter[tuple[str, str]] = Counter()
        self.rejected: Counter[tuple[str, str]] = Counter()
        self.inputs_dropped: Counter[tuple[str, str]] = Counter()
        self.submitted: Counter[tuple[str, str]] = Counter()
        self.ignored: Counter[tuple[str, str]] = Counter()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"patchd_capture_{name}", doc, labels=["source", *labels])

        received = counter("events", "Logger CloudEvents received (monitored streams)", ["type"])
        rejected = counter("rejected", "Logger CloudEvents rejected before joining", ["reason"])
        dropped = counter("inputs_dropped", "Inputs dropped (prediction kept)", ["reason"])
        submitted = counter("submitted", "Prediction events handed to ingest", ["result"])
        ignored = counter(
            "ignored", "CloudEvents of streams not monitored (answered 200)", ["reason"]
        )
        for fam, ctr in (
            (received, self.received),
            (rejected, self.rejected),
            (dropped, self.inputs_dropped),
            (submitted, self.submitted),
            (ignored, self.ignored),
        ):
            for labels, value in sorted(ctr.items()):
                fam.add_metric(list(labels), value)
        yield from (received, rejected, dropped, submitted, ignored)
        yield from self._join_metrics(counter, GaugeMetricFamily)

    def _join_metrics(self, counter: Any, gauge_cls: Any) -> Iterator[Any]:
        orphans = counter("orphans", "Halves whose partner never came within the TTL", ["half"])
        dups = counter("duplicates", "Halves received twice", [])
        joined = counter("joined", "Request/response pairs joined", [])
        pending = gauge_cls(
            "patchd_capture_pending", "Halves waiting for a partner", labels=["source"]
        )
        for source, joiner in sorted(self.joiners.items()):
            c = joiner.counts()
            orphans.add_metric([source, "request"], c.orphan_requests)
            orphans.add_metric([source, "response"], c.orphan_responses)
            dups.add_metric([source], c.duplicates)
            joined.add_metric([source], c.joined)
            pending.add_metric([source], c.pending)
        yield from (orphans, dups, joined, pending)


def capture_stats(services: Services) -> tuple[CaptureStats, bool]:
    """The serve-wide :class:`CaptureStats` (created by the first source; True when new)."""
    found = services.extras.get(STATS_KEY)
    if isinstance(found, CaptureStats):
        return found, False
    stats = CaptureStats()
    services.extras[STATS_KEY] = stats
    return stats, True


# --------------------------------------------------------------------------- the component


@dataclass(frozen=True)
class Outcome:
    """What the route answers for one CloudEvent."""

    status: str  # buffered | joined | duplicate | ignored
    accepted: int = 0
    duplicates: int = 0
    rejected: tuple[dict[str, Any], ...] = ()


class CloudEventSource(Component):
    """A logger CloudEvents route joined into prediction events (see the module docstring)."""

    source = "cloudevents"
    path = "/v1/sources/cloudevents"
    request_types: frozenset[str] = frozenset()
    response_types: frozenset[str] = frozenset()
    ignored_types: frozenset[str] = frozenset()  # valid events that carry no prediction

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.settings: CloudEventSourceConfig = getattr(services.config.sources, self.source)
        self.class_names = tuple(services.config.model.class_names)
        self.model = services.config.model.name
        self.joiner: PairJoiner[Part] = PairJoiner(
            self.settings.ttl_s,
            self.settings.max_pending,
            max_bytes=self.settings.max_pending_bytes,
            weigh=part_size,
        )
        self.stats, self._owns_stats = capture_stats(services)
        self.stats.joiners[self.source] = self.joiner
        self._roots = tuple(p.resolve() for p in services.config.sources.allowed_roots)
        self._max_pixels = services.config.sources.max_image_pixels
        self._max_inline = services.config.sources.max_inline_bytes
        self._max_containers = services.config.sources.max_json_containers

    # -- subclass hooks
    @abstractmethod
    def join_key(self, event: CloudEvent) -> str:
        """The pair's key: the request id and the stream (see :func:`stream_key`)."""

    def skip_reason(self, event: CloudEvent) -> str | None:
        """Why this event's stream is not the monitored one (counted, answered 200), or None."""
        wanted = self.settings.endpoints
        if wanted is not None and (event.attr("endpoint") or "") not in wanted:
            return "other_endpoint"
        return None

    def stream_groups(self, event: CloudEvent) -> dict[str, str]:
        """``{endpoint_group: ce-endpoint}``: which stream (default/canary...) an event is from."""
        attr, endpoint = self.settings.endpoint_group, event.attr("endpoint")
        return {attr: endpoint} if attr and endpoint else {}

    @abstractmethod
    def decode(self, event: CloudEvent, half: Half) -> Part: ...

    # -- Component
    def routers(self) -> Sequence[APIRouter]:
        if not self.settings.enabled:
            return ()
        from fastapi import APIRouter, Depends

        router = APIRouter(tags=["sources"])

        async def receive(request: Request) -> Response:
            return await self.respond(dict(request.headers), await request.body())

        router.add_api_route(
            self.path,
            receive,
            methods=["POST"],
            dependencies=[Depends(authorize_logger)],
            summary=f"{self.source} logger CloudEvents (binary or structured mode)",
        )
        return (router,)

    def collectors(self) -> Iterable[Collector]:
        return (self.stats,) if self._owns_stats else ()

    def start(self) -> None:
        every = max(0.2, min(5.0, self.settings.ttl_s / 4))
        self.services.scheduler.add_job(
            self.sweep,
            "interval",
            seconds=every,
            id=f"{self.source}-join-sweep",
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )

    def stop(self) -> None:
        """Halves still waiting at shutdown are orphans (serve no longer takes records)."""
        lost = self.joiner.drain()
        if lost:
            log.info(
                "%s: %d unjoined halves counted as orphans at shutdown", self.source, len(lost)
            )

    def sweep(self) -> None:
        self._emit_orphans(self.joiner.expire())

    # -- request handling
    async def respond(self, headers: Mapping[str, str], body: bytes) -> Response:
        """Decode and join in the threadpool, then await the commit of a completed pair."""
        from fastapi.responses import JSONResponse
        from starlette.concurrency import run_in_threadpool

        try:
            status, pair, future = await run_in_threadpool(self.prepare, headers, body)
            result = await asyncio.wrap_future(future) if future is not None else None
        except ValidationError as err:
            return JSONResponse({"reason": err.reason, "message": str(err)}, status_code=400)
        except QueueFullError as err:
            retry = str(max(1, round(err.retry_after)))
            body_json = {"reason": "queue_full", "message": str(err)}
            return JSONResponse(body_json, status_code=429, headers={"Retry-After": retry})
        except PatchdError as err:  # shutting down, disk full, store failure: the sender retries
            retry = str(max(1, round(getattr(err, "retry_after", 5))))
            body_json = {"reason": "unavailable", "message": str(err)}
            return JSONResponse(body_json, status_code=503, headers={"Retry-After": retry})
        answer: dict[str, Any] = {"status": status, "accepted": 0, "duplicates": 0, "rejected": []}
        if result is not None:
            answer.update(accepted=result.accepted, duplicates=result.duplicates)
            answer["rejected"] = [
                {"index": e.index, "reason": e.reason, "message": e.message}
                for e in result.rejected
            ]
        # 200, not 202: KServe's logger logs every answer but 200 as a failed delivery
        return JSONResponse(answer, status_code=200)

    def handle(self, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Synchronous :meth:`respond` (waits for the commit); raises on bad input."""
        status, _, future = self.prepare(headers, body)
        if future is None:
            return Outcome(status)
        result = future.result()
        rejected = tuple(
            {"index": e.index, "reason": e.reason, "message": e.message} for e in result.rejected
        )
        return Outcome(status, result.accepted, result.duplicates, rejected)

    def prepare(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[str, Joined[Part] | None, Future[Any] | None]:
        """Parse, decode and join one CloudEvent; a completed pair is submitted to ingest."""
        try:
            read = self._read(headers, body)
        except ValidationError as err:
            # one event, two views: the adapter's counter (by cause) and ingest's, which the
            # rejection alert reads; no record of it exists, so ingest never counts it itself
            self.stats.rejected[(self.source, err.reason)] += 1
            if self.services.ingest is not None:
                self.services.ingest.stats.reject_unread(self.source, err.reason)
            log.info("%s: rejected CloudEvent: %s", self.source, err)
            raise
        if isinstance(read, str):
            self.stats.ignored[(self.source, read)] += 1
            return "ignored", None, None
        event, half, part = read
        result, expired = self.joiner.add(self.join_key(event), half, part)
        self._emit_orphans(expired)
        if result.pair is None:
            return result.status, None, None
        try:
            future = self.submit(result.pair)
        except PatchdError:
            self.joiner.restore(result.pair, "response" if half == "request" else "request")
            raise
        return "joined", result.pair, future

    def _read(self, headers: Mapping[str, str], body: bytes) -> tuple[CloudEvent, Half, Part] | str:
        """The validation boundary of a CloudEvent: anything wrong is a ValidationError; an event
        of a stream this serve does not monitor is the reason it is ignored."""
        try:
            event = parse_cloudevent(headers, body, self.settings.max_decompressed_bytes)
            if event.type in self.ignored_types:
                return "event_type"
            half = self._half(event.type)
            skip = self.skip_reason(event)
            if skip is not None:
                return skip
            self.stats.received[(self.source, half)] += 1  # of the monitored streams only
            containers = event.data.count(b"[") + event.data.count(b"{")
            if containers > self._max_containers:
                message = f"{containers} JSON arrays/objects, over sources.max_json_containers"
                raise ValidationError("too_large", message)
            part = self.decode(event, half)
        except ValidationError:
            raise
        except Exception as err:  # noqa: BLE001 - deep JSON, huge ints, shapes no branch expected
            log.warning("%s: unreadable CloudEvent (%s)", self.source, type(err).__name__)
            message = f"body could not be read: {type(err).__name__}: {str(err)[:160]}"
            raise ValidationError("unsupported_body", message) from None
        count, limit = instances(part), self.settings.max_instances
        if count > limit:
            message = f"{count} instances in one event, over max_instances={limit}"
            raise ValidationError("too_large", message)
        return event, half, part

    def _half(self, ce_type: str) -> Half:
        if ce_type in self.request_types:
            return "request"
        if ce_type in self.response_types:
            return "response"
        known = sorted(self.request_types | self.response_types)
        raise ValidationError("unknown_type", f"ce-type {ce_type!r} is not one of {known}")

    def _emit_orphans(self, orphans: list[Joined[Part]]) -> None:
        """Expired responses still carry a prediction: submit them (without waiting)."""
        if not self.settings.emit_response_orphans:
            return
        for pair in orphans:
            if pair.response is None:
                continue
            try:
                self.submit(pair)
            except PatchdError as err:
                log.warning("%s: orphan response %s lost: %s", self.source, pair.key, err)

    def submit(self, pair: Joined[Part]) -> Future[Any] | None:
        """Hand a pair's events to ingest; counters update when the batch commits."""
        records = self.records(pair)
        if not records:
            return None
        ingest = self.services.ingest
        future = ingest.predictions_future(records, self.source)
        future.add_done_callback(lambda f: self._account(pair.key, f))
        return future

    def _account(self, key: str, future: Future[Any]) -> None:
        if future.exception() is not None:
            log.warning("%s: events of %s not written: %s", self.source, key, future.exception())
            return
        result = future.result()
        self.stats.submitted[(self.source, "accepted")] += result.accepted
        self.stats.submitted[(self.source, "duplicate")] += result.duplicates
        self.stats.submitted[(self.source, "rejected")] += len(result.rejected)
        for err in result.rejected:
            log.info("%s: event of %s rejected by ingest: %s", self.source, key, err.message)

    # -- pair -> schema-v1 events
    def records(self, pair: Joined[Part]) -> list[dict[str, Any]]:
        """One schema-v1 event per instance: ids ``<key>`` (1 instance) or ``<key>-<i>``."""
        req, resp = pair.request, pair.response
        if not isinstance(resp, ResponsePart):
            return []
        inputs = req.inputs if isinstance(req, RequestPart) else ()
        n = len(resp.predictions)
        if resp.inputs and len(resp.inputs) == n:
            inputs = resp.inputs  # URIs from headers win over what the body holds
        elif inputs and len(inputs) != n:
            self._drop_input("count_mismatch", n)
            inputs = ()
        groups = {**(req.groups if req is not None else {}), **resp.groups}
        ts = (req.ts if req is not None else None) or resp.ts
        ident = event_id(pair.key)
        out = []
        for i, p in enumerate(resp.predictions):
            event: dict[str, Any] = {
                "id": ident if n == 1 else f"{ident}-{i}",
                "model": self._model_name(resp.model or (req.model if req else None)),
                "pred": p.pred,
            }
            self._optional(event, ts, resp.model_version, p.probs, groups)
            ref = self.input_field(inputs[i] if i < len(inputs) else None)
            if ref is not None:
                event["input"] = ref
            out.append(event)
        return out

    def _optional(
        self,
        event: dict[str, Any],
        ts: str | None,
        version: str | None,
        probs: tuple[float, ...] | None,
        groups: Mapping[str, str],
    ) -> None:
        if ts:
            event["ts"] = ts
        if version:
            event["model_version"] = version
        if probs is not None:
            event["probs"] = list(probs)
        if groups:
            event["groups"] = dict(groups)

    def _model_name(self, served: str | None) -> str:
        """The served name maps to ``model.name`` when it is the one this serve watches."""
        expected = self.settings.model or self.model
        return self.model if served in (None, "", expected) else served

    def input_field(self, ref: InputRef | None) -> dict[str, str] | None:
        """An :class:`InputRef` as the event's ``input``, or None (counted) when serve could not
        use it; a bad input never costs the prediction."""
        if ref is None:
            return None
        if ref.dropped is not None:
            self._drop_input(ref.dropped)
            return None
        if ref.data is not None:
            if not ref.data.startswith(IMAGE_MAGIC):
                self._drop_input("not_image")
                return None
            from patchd.ingest.records import check_image

            try:  # decoded here too, so that a bad image costs the input, not the prediction
                check_image(ref.data, self._max_pixels)
            except ValidationError:
                self._drop_input("not_image")
                return None
            if len(ref.data) > self._max_inline:
                self._drop_input("too_large")
                return None
            return {"base64": base64.b64encode(ref.data).decode("ascii")}
        return self._uri_field(ref.uri or "")

    def _uri_field(self, uri: str) -> dict[str, str] | None:
        from patchd.ingest.records import check_inside, resolve_input_path

        try:
            check_inside(resolve_input_path(uri), self._roots, uri)
        except ValidationError as err:
            self._drop_input(err.reason)
            return None
        return {"uri": uri}

    def _drop_input(self, reason: str, n: int = 1) -> None:
        self.stats.inputs_dropped[(self.source, reason)] += n

    def header_groups(self, headers: Mapping[str, Any]) -> dict[str, str]:
        """Group attributes from forwarded request headers: ``x-patchd-group-<attr>`` and the
        configured ``group_headers`` (header name → attribute), matched case-insensitively."""
        wanted = {k.lower(): v for k, v in self.settings.group_headers.items()}
        out: dict[str, str] = {}
        for name, value in headers.items():
            low = str(name).lower()
            attr = wanted.get(low)
            if attr is None and low.startswith("x-patchd-group-"):
                attr = low[len("x-patchd-group-") :]
            text = first_value(value)
            if attr and text is not None:
                out[attr] = text
        return out

    def header_inputs(self, headers: Mapping[str, Any], n: int) -> tuple[InputRef | None, ...]:
        """Input URIs from the configured header (comma-separated, one per instance)."""
        wanted = self.settings.input_uri_header.lower()
        for name, value in headers.items():
            if str(name).lower() == wanted:
                uris = [u.strip() for u in (first_value(value) or "").split(",") if u.strip()]
                if len(uris) == n:
                    return tuple(InputRef(uri=u) for u in uris)
        return ()


def stream_key(ident: str, *stream: str | None) -> str:
    """A join key: the request id and the stream it belongs to (component, endpoint, node),
    unambiguous whatever the strings hold; :func:`event_id` gives the request id back."""
    return json.dumps([*(s or "" for s in stream), ident])


def event_id(key: str) -> str:
    """The request id of a :func:`stream_key` (the events' id)."""
    return str(json.loads(key)[-1])


async def authorize_logger(request: Request) -> None:
    """Bearer token with the ``ingest`` scope, or ``?token=`` in the URL: KServe's and Seldon's
    loggers cannot add headers, only point at a URL (keep such URLs out of shared logs)."""
    from fastapi import HTTPException

    from patchd.api.auth import bearer

    token = bearer(request) or request.query_params.get("token")
    principal = request.app.state.tokens.authenticate(token) if token else None
    if principal is None:
        raise HTTPException(
            401,
            "missing or invalid token (Authorization: Bearer or ?token=)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if "ingest" not in principal.scopes:
        raise HTTPException(403, f"token {principal.name!r} lacks the 'ingest' scope")


def first_value(value: Any) -> str | None:
    """KServe forwards header values as lists (``{"X-Site": ["B"]}``); take the first."""
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None or isinstance(value, dict):
        return None
    return str(value)

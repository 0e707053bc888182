"""ASGI middleware that logs every prediction a FastAPI/Starlette model server makes to patchd.

::

    from fastapi import FastAPI
    from patchd.plugins.serving.asgi import PatchdMiddleware
    from patchd.plugins.serving.client import PatchdLogger

    app = FastAPI()
    logger = PatchdLogger("http://127.0.0.1:8321", token=os.environ["PATCHD_INGEST_TOKEN"])
    app.add_middleware(PatchdMiddleware, logger=logger, paths=("/predict",))

Per matching request (method and path prefix) whose response is 2xx, the middleware queues one
event per predicted instance. Its work on the request path is a header scan, a copy of the
response body chunks and one ``deque.append``; the response body is parsed later, by the
logger's sender thread, with ``extract`` (default: JSON ``{"pred", "probs"}``, a list of those,
or ``{"predictions": [...]}``; see :func:`default_extract`).

- id: the ``x-request-id`` header (``id_header``), else ``<random prefix>-<n>``; batches get
  ``<id>-<i>``. The id is returned to the caller in ``x-patchd-id`` so labels can follow.
- groups: ``x-patchd-group-<attr>`` headers, ``group_headers`` (header → attribute), and
  ``groups(scope)`` (a user callback, run on the request path: keep it cheap).
- input: ``x-patchd-input-uri`` (comma-separated for batches), else ``input_from(scope,
  request_body)`` → URI string / image bytes / None (run in the sender thread), else with
  ``inline_inputs=True`` the raw request body when it is a PNG or JPEG (patchd stores it).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import Any

from patchd.plugins.serving.client import PatchdLogger

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Extract = Callable[[bytes], "Mapping[str, Any] | Sequence[Mapping[str, Any]] | None"]
InputFrom = Callable[[Scope, bytes], "str | bytes | None"]
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
GROUP_PREFIX = b"x-patchd-group-"


def default_extract(body: bytes) -> list[dict[str, Any]]:
    """``{"pred": 1, "probs": [...]}``, a list of such objects, or ``{"predictions": [...]}``
    whose items are such objects, class indices/names, or score lists."""
    parsed = json.loads(body)
    if isinstance(parsed, dict) and isinstance(parsed.get("predictions"), list):
        parsed = parsed["predictions"]
    items = parsed if isinstance(parsed, list) else [parsed]
    return [_one(item) for item in items]


def _one(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return {k: v for k, v in item.items() if k in ("pred", "probs", "model_version")}
    if isinstance(item, list) and item and all(isinstance(v, int | float) for v in item):
        return {"pred": max(range(len(item)), key=item.__getitem__), "probs": item}
    return {"pred": item}


class PatchdMiddleware:
    """Pure ASGI middleware (no Starlette import); see the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        logger: PatchdLogger,
        *,
        model: str | None = None,
        paths: Sequence[str] = ("/",),
        methods: Sequence[str] = ("POST",),
        extract: Extract = default_extract,
        id_header: str = "x-request-id",
        group_headers: Mapping[str, str] | None = None,
        groups: Callable[[Scope], Mapping[str, str]] | None = None,
        input_uri_header: str = "x-patchd-input-uri",
        input_from: InputFrom | None = None,
        inline_inputs: bool = False,
        max_body_bytes: int = 4 << 20,
    ) -> None:
        self.app, self.logger, self.model = app, logger, model
        self.paths, self.methods = tuple(paths), frozenset(methods)
        self.extract, self.groups_cb, self.input_from = extract, groups, input_from
        self.inline_inputs, self.max_body_bytes = inline_inputs, max_body_bytes
        self._id_header = id_header.lower().encode()
        self._uri_header = input_uri_header.lower().encode()
        self._group_headers = {k.lower().encode(): v for k, v in (group_headers or {}).items()}
        self._want_request = inline_inputs or input_from is not None
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in self.methods
            or not scope["path"].startswith(self.paths)
        ):
            await self.app(scope, receive, send)
            return
        started = time.time()
        rid, uri, groups = self._scan(scope)
        capture = _Capture(rid, self.max_body_bytes, self._want_request)
        await self.app(scope, capture.wrap_receive(receive), capture.wrap_send(send))
        if capture.ok:
            self.logger.log_lazy(lambda: self._events(scope, rid, started, uri, groups, capture))

    def _scan(self, scope: Scope) -> tuple[str, str | None, dict[str, str]]:
        rid = uri = None
        groups: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == self._id_header:
                rid = value.decode("latin-1")
            elif name == self._uri_header:
                uri = value.decode("latin-1")
            elif name.startswith(GROUP_PREFIX):
                groups[name[len(GROUP_PREFIX) :].decode("latin-1")] = value.decode("latin-1")
            elif name in self._group_headers:
                groups[self._group_headers[name]] = value.decode("latin-1")
        if self.groups_cb is not None:
            groups.update(self.groups_cb(scope))
        return rid or f"{self._prefix}-{next(self._counter)}", uri, groups

    def _events(
        self,
        scope: Scope,
        rid: str,
        ts: float,
        uri: str | None,
        groups: dict[str, str],
        capture: _Capture,
    ) -> list[dict[str, Any]]:
        """Runs in the sender thread: parse the response and build the events."""
        found = self.extract(b"".join(capture.response))
        preds = [] if found is None else [found] if isinstance(found, Mapping) else list(found)
        inputs = self._inputs(scope, uri, b"".join(capture.request), len(preds))
        out = []
        for i, pred in enumerate(preds):
            event: dict[str, Any] = {"id": rid if len(preds) == 1 else f"{rid}-{i}", "ts": ts}
            event.update(pred)
            if self.model:
                event["model"] = self.model
            if groups:
                event["groups"] = groups
            if inputs[i] is not None:
                event["input"] = inputs[i]
            out.append(event)
        return out

    def _inputs(self, scope: Scope, uri: str | None, body: bytes, n: int) -> list[Any]:
        if uri:
            uris = [u.strip() for u in uri.split(",")]
            return [{"uri": u} for u in uris] if len(uris) == n else [None] * n
        found: str | bytes | None = None
        if self.input_from is not None:
            found = self.input_from(scope, body)
        elif self.inline_inputs and body.startswith(IMAGE_MAGIC):
            found = body
        if found is None or n != 1:
            return [None] * n
        if isinstance(found, bytes):
            return [{"base64": base64.b64encode(found).decode("ascii")}]
        return [{"uri": found}]


class _Capture:
    """Copies the response (and optionally request) body while it streams; adds x-patchd-id."""

    __slots__ = ("rid", "limit", "want_request", "request", "response", "size", "status", "done")

    def __init__(self, rid: str, limit: int, want_request: bool) -> None:
        self.rid, self.limit, self.want_request = rid, limit, want_request
        self.request: list[bytes] = []
        self.response: list[bytes] = []
        self.size = 0
        self.status = 0
        self.done = False

    @property
    def ok(self) -> bool:
        return self.done and 200 <= self.status < 300 and self.size <= self.limit

    def wrap_receive(self, receive: Receive) -> Receive:
        if not self.want_request:
            return receive

        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "http.request" and sum(map(len, self.request)) < self.limit:
                self.request.append(message.get("body", b""))
            return message

        return wrapped

    def wrap_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                self.status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-patchd-id", self.rid.encode()),
                ]
            elif kind == "http.response.body":
                body = message.get("body", b"")
                self.size += len(body)
                if self.size <= self.limit:
                    self.response.append(body)
                self.done = not message.get("more_body", False)
            await send(message)

        return wrapped

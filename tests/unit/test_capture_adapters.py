"""ASGI middleware and TorchServe mixin: what they queue, and that they never break a request."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from patchd.plugins.serving.asgi import PatchdMiddleware, default_extract
from patchd.plugins.serving.client import PatchdLogger
from patchd.plugins.serving.torchserve import PatchdHandlerMixin
from tests.capture_payloads import PNG


class FakeLogger(PatchdLogger):
    """Collects what would be shipped; runs lazy builders like the sender thread would."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", autostart=False)
        self.events: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while self._queue:
            path, item = self._queue.popleft()
            if path == "lazy":
                made = item()
                self.events.extend([made] if isinstance(made, dict) else list(made or []))
            else:
                self.events.append(item)
        return self.events


def make_app(logger: FakeLogger, **kwargs: Any) -> TestClient:
    app = FastAPI()

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        await request.body()
        if request.headers.get("x-batch"):
            return {"predictions": [[0.9, 0.1], {"pred": "malignant", "probs": [0.2, 0.8]}]}
        return {"pred": 1, "probs": [0.3, 0.7]}

    @app.post("/fail")
    async def fail() -> Any:
        from fastapi import HTTPException

        raise HTTPException(500, "boom")

    @app.get("/health")
    async def health() -> Any:
        return {"ok": True}

    app.add_middleware(PatchdMiddleware, logger=logger, paths=("/predict", "/fail"), **kwargs)
    return TestClient(app)


def test_middleware_logs_ids_groups_and_uri() -> None:
    logger = FakeLogger()
    client = make_app(
        logger,
        model="skin",
        group_headers={"x-camera": "camera"},
        groups=lambda scope: {"route": scope["path"].strip("/")},
    )
    r = client.post(
        "/predict",
        json={"x": 1},
        headers={
            "x-request-id": "req-1",
            "x-patchd-group-site": "B",
            "x-camera": "c7",
            "x-patchd-input-uri": "file:///srv/a.png",
        },
    )
    assert r.status_code == 200 and r.headers["x-patchd-id"] == "req-1"
    auto = client.post("/predict", json={}, headers={"x-batch": "1"})
    client.post("/fail")
    client.get("/health")
    events = logger.drain()
    assert events[0] == {
        "id": "req-1",
        "ts": events[0]["ts"],
        "pred": 1,
        "probs": [0.3, 0.7],
        "model": "skin",
        "groups": {"site": "B", "camera": "c7", "route": "predict"},
        "input": {"uri": "file:///srv/a.png"},
    }
    rid = auto.headers["x-patchd-id"]
    assert [(e["id"], e["pred"]) for e in events[1:]] == [
        (f"{rid}-0", 0),
        (f"{rid}-1", "malignant"),
    ]
    assert len(events) == 3  # the 500 and the unmatched path are not logged


def test_middleware_inline_image_and_custom_extractor() -> None:
    logger = FakeLogger()
    client = make_app(logger, inline_inputs=True, extract=lambda body: {"pred": 0})
    client.post("/predict", content=PNG, headers={"content-type": "image/png"})
    client.post("/predict", content=b"not an image")
    events = logger.drain()
    assert events[0]["input"]["base64"].startswith("iVBORw0KGgo") and "input" not in events[1]


def test_default_extract_shapes() -> None:
    assert default_extract(b'{"pred": 2}') == [{"pred": 2}]
    assert default_extract(b"[[0.1, 0.9]]") == [{"pred": 1, "probs": [0.1, 0.9]}]
    assert default_extract(b'{"predictions": ["cat", 3]}') == [{"pred": "cat"}, {"pred": 3}]


class Base:
    def initialize(self, context: Any) -> None:
        self.initialized = True

    def handle(self, data: list[Any], context: Any) -> list[Any]:
        return [{"tabby": 0.7, "tiger": 0.2}, [0.1, 0.9], {"pred": 0, "probs": [0.6, 0.4]}]


class Context:
    model_name = "cats"
    request_ids = {0: "a", 1: "b", 2: "c"}

    def get_request_id(self, idx: int) -> str:
        return self.request_ids[idx]

    def get_request_header(self, idx: int, key: str) -> str | None:
        return (
            {"x-patchd-group-site": "S1", "x-patchd-input-uri": "/srv/x.png"}.get(key)
            if idx == 0
            else None
        )


class Handler(PatchdHandlerMixin, Base):
    patchd_group_headers = ("site",)


def test_torchserve_mixin_logs_each_request(monkeypatch: Any) -> None:
    monkeypatch.delenv("PATCHD_URL", raising=False)
    handler = Handler()
    handler.initialize(Context())
    assert handler.patchd_logger is None and handler.patchd_model == "cats"
    handler.patchd_logger = logger = FakeLogger()
    outputs = handler.handle([{}, {}, {}], Context())
    assert len(outputs) == 3
    assert logger.drain() == [
        {
            "pred": "tabby",
            "id": "a",
            "model": "cats",
            "groups": {"site": "S1"},
            "input": {"uri": "/srv/x.png"},
        },
        {"pred": 1, "probs": [0.1, 0.9], "id": "b", "model": "cats"},
        {"pred": 0, "probs": [0.6, 0.4], "id": "c", "model": "cats"},
    ]


def test_client_modules_import_light() -> None:
    code = (
        "import sys; import patchd.plugins.serving.client, patchd.plugins.serving.asgi, "
        "patchd.plugins.serving.torchserve; "
        "heavy = ('httpx', 'torch', 'fastapi', 'starlette', 'numpy', 'ts'); "
        "bad = [m for m in heavy if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

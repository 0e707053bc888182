"""Helpers for the approval-page tests: a real serve with the UI on, a webhook receiver, forms."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.gate_support import png_bytes, write_weights
from tests.procs import PATCHD, TOKEN, ServeProcess, start_serve, write_config

APPROVER_TOKEN = "alice-approve-token-0123456789abcdef"
READER_TOKEN = "bob-read-only-token-0123456789abcdef"


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver: keeps (path, JSON body) of every POST."""

    received: list[tuple[str, dict[str, Any]]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        data = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).received.append((self.path, json.loads(data)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class UiServe:
    serve: ServeProcess
    config_path: Path
    receiver: ThreadingHTTPServer

    @property
    def state(self) -> Path:
        return self.serve.state_dir

    @property
    def artifacts(self) -> Path:
        return self.state / "artifacts"


def start_ui_serve(tmp_path: Path, redis_url: str, **ui: Any) -> Iterator[UiServe]:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    Receiver.received = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_port}"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{APPROVER_TOKEN} read,approve alice\n{READER_TOKEN} read bob\n")
    tokens.chmod(0o600)  # serve refuses a token file others can read
    cfg = write_config(
        tmp_path,
        {
            "redis": {"url": redis_url, "embedded": "never"},
            "model": {"name": "m", "class_names": ["top", "other"]},
            "groups": {"attributes": ["color"]},
            "monitor": {"interval_s": 0.5, "reference_window": 200, "n_min": 10},
            "trigger": {"enabled": False},
            "api": {"token_file": str(tokens)},
            "ui": {"enabled": True, **ui},
            "notify": {
                "webhooks": [
                    {"url": f"{hook}/generic", "format": "generic"},
                    {
                        "url": f"{hook}/slack",
                        "format": "slack",
                        "on": ["awaiting_approval", "fail"],
                    },
                ]
            },
        },
    )
    incumbent = tmp_path / "incumbent.safetensors"
    write_weights(incumbent, 100.0)
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    done = subprocess.run(
        [PATCHD, "registry", "import", "--weights", str(incumbent), "-c", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    serve = start_serve(tmp_path, {}, config_path=cfg)
    try:
        yield UiServe(serve, cfg, receiver)
    finally:
        serve.stop()
        receiver.shutdown()


def write_regions(
    artifacts: Path, run_id: str, sources: tuple[str, ...] = ("top", "other")
) -> Path:
    """A run with the ``vae`` augmenter's ``synthesize/regions.json`` (schema 2): one region per
    source class (ids 0, 1, ...), each with a real PNG sample grid. Returns the run folder."""
    run = artifacts / "runs" / run_id
    (run / "synthesize" / "previews").mkdir(parents=True, exist_ok=True)
    regions = []
    for i, source in enumerate(sources):
        other = sources[(i + 1) % len(sources)]
        (run / "synthesize" / "previews" / f"region_{i}.png").write_bytes(png_bytes(60 + i, 40))
        regions.append(
            {
                "region": i,
                "weight": 0.6 - 0.2 * i,
                "n_codes": 30 - i,
                "source_label": i,
                "source_name": source,
                "predicted": other,
                "prediction_mix": {other: 12, source: 4},
                "preview": f"previews/region_{i}.png",
                "spread": 4.0 + i,
                "real_spread": 8.0,
                "novelty": 1.25 + i,
                "fd": 40.0,
            }
        )
    body = {"schema": 2, "regions": regions, "realism": {}, "vae": {}}
    (run / "synthesize" / "regions.json").write_text(json.dumps(body))
    return run


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field in the page"
    return found.group(1)


def login(client: httpx.Client, token: str) -> httpx.Response:
    """GET the login form, POST the token with its CSRF value (the client keeps the cookies)."""
    form = client.get("/ui/login")
    assert form.status_code == 200
    return client.post("/ui/login", data={"token": token, "csrf": csrf_of(form.text)})


def traffic(n: int, seed: int, accuracy: dict[tuple[str, str], float]) -> tuple[list, list]:
    """n predictions (classes top/other, color red/green) and their labels."""
    rng = np.random.default_rng(seed)
    preds, labels = [], []
    for i in range(n):
        label = int(rng.integers(2))
        color = "green" if rng.random() < 0.3 else "red"
        right = rng.random() < accuracy[(("top", "other")[label], color)]
        pred = label if right else 1 - label
        rid = f"s{seed}-{i}"
        p1 = 0.8 if pred == 1 else 0.2
        preds.append(
            {
                "id": rid,
                "model": "m",
                "pred": pred,
                "probs": [1 - p1, p1],
                "groups": {"color": color},
            }
        )
        labels.append({"id": rid, "model": "m", "label": label})
    return preds, labels

"""A small Chrome DevTools Protocol driver for the browser tests: the Debian ``chromium``, headless,
driven over its DevTools WebSocket (no Playwright download, no third-party browser build)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)

Event = dict[str, Any]


class Browser:
    """One headless Chromium with one page; every event seen is kept in ``events``."""

    def __init__(self, profile: Path, width: int = 1280, height: int = 900) -> None:
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as resp:
            target = json.load(resp)
        self.ws: ClientConnection = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.events: list[Event] = []
        self._next = 0
        self._replies: dict[int, Event] = {}
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    # -- protocol ------------------------------------------------------------------------------
    def send(self, method: str, params: dict[str, Any] | None = None) -> int:
        self._next += 1
        self.ws.send(json.dumps({"id": self._next, "method": method, "params": params or {}}))
        return self._next

    def _pump(self, timeout: float) -> None:
        msg = json.loads(self.ws.recv(timeout=timeout))
        if "id" in msg:
            self._replies[msg["id"]] = msg
        else:
            self.events.append(msg)

    def reply(self, call_id: int, timeout: float = 30.0) -> Event:
        deadline = time.monotonic() + timeout
        while call_id not in self._replies:
            self._pump(max(0.01, deadline - time.monotonic()))
        msg = self._replies.pop(call_id)
        if "error" in msg:
            raise RuntimeError(f"CDP error: {msg['error']}")
        return dict(msg["result"])

    def call(self, method: str, params: dict[str, Any] | None = None) -> Event:
        return self.reply(self.send(method, params))

    def wait_event(self, match: Callable[[Event], bool], timeout: float = 30.0) -> Event:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                if match(event):
                    self.events.remove(event)
                    return event
            seen = len(self.events)
            if time.monotonic() > deadline:
                raise TimeoutError("no matching DevTools event")
            try:
                self._pump(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                pass

    # -- page ----------------------------------------------------------------------------------
    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.settle()

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the page's document has loaded (after a navigation or a form post)."""
        self.wait_event(lambda e: e.get("method") == "Page.loadEventFired", timeout)

    def click_and_confirm(self, selector: str, accept: bool = True) -> str:
        """Click; answer the page's confirm() dialog; wait for the next page. The dialog's text."""
        pending = self.send(
            "Runtime.evaluate", {"expression": f"document.querySelector({selector!r}).click()"}
        )
        dialog = self.wait_event(lambda e: e.get("method") == "Page.javascriptDialogOpening")
        self.call("Page.handleJavaScriptDialog", {"accept": accept})
        self.reply(pending)
        if accept:
            self.settle()
        return str(dialog["params"]["message"])

    @property
    def url(self) -> str:
        return str(self.js("location.href"))

    def text(self) -> str:
        return str(self.js("document.body.innerText"))

    def requested_urls(self) -> list[str]:
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e.get("method") == "Network.requestWillBeSent"
        ]

    def screenshot(self, path: Path) -> None:
        """The whole page (beyond the viewport) as a PNG."""
        height = int(self.js("document.documentElement.scrollHeight"))
        width = int(self.js("document.documentElement.clientWidth"))
        shot = self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            try:
                ws.close()
            except Exception:
                pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

"""Production traffic: images go to the model server, labels follow to patchd a little later."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from patchd.demo.pool import Draw, ProductionPool, write_png


@dataclass(frozen=True)
class Served:
    id: str
    label: int
    pred: int
    color: str
    minority: bool
    model_version: str


@dataclass
class LiveAccuracy:
    """The demo's own tally of live accuracy per (class, colour), to print beside the monitor's."""

    correct: dict[tuple[int, str], int] = field(default_factory=dict)
    total: dict[tuple[int, str], int] = field(default_factory=dict)

    def add(self, s: Served) -> None:
        key = (s.label, s.color)
        self.total[key] = self.total.get(key, 0) + 1
        self.correct[key] = self.correct.get(key, 0) + int(s.pred == s.label)

    def worst(self, n_min: int = 20) -> float | None:
        accs = [self.correct[k] / n for k, n in self.total.items() if n >= n_min]
        return min(accs) if accs else None


class Stream:
    """Sends drawn images to the model server and their labels to patchd after a delay."""

    def __init__(
        self,
        server_url: str,
        patchd_url: str,
        token: str,
        images: Path,
        label_delay_s: float,
        rate_per_s: float,
    ) -> None:
        self.server = httpx.Client(base_url=server_url, timeout=30)
        self.patchd = httpx.Client(
            base_url=patchd_url, timeout=30, headers={"Authorization": f"Bearer {token}"}
        )
        self.images = images
        self.label_delay_s = label_delay_s
        self.interval = 1.0 / rate_per_s
        self.pending: deque[tuple[float, str, int]] = deque()
        self.sent = 0

    def close(self) -> None:
        self.flush_labels(force=True)
        self.server.close()
        self.patchd.close()

    def send(self, pool: ProductionPool, share: float, phase: str) -> Served:
        draw = pool.draw(share)
        event_id = f"{phase}-{self.sent:06d}"
        self.sent += 1
        path = self.images / f"{event_id}.png"
        write_png(draw, path)
        served = self._predict(event_id, draw, path)
        self.pending.append((time.monotonic() + self.label_delay_s, event_id, draw.label))
        self.flush_labels()
        time.sleep(self.interval)
        return served

    def _predict(self, event_id: str, draw: Draw, path: Path) -> Served:
        headers = {
            "x-request-id": event_id,
            "x-patchd-group-color": draw.color_name,
            "x-patchd-input-uri": path.resolve().as_uri(),
        }
        response = self.server.post(
            "/predict", json={"uri": path.resolve().as_uri()}, headers=headers
        )
        response.raise_for_status()
        body = response.json()
        return Served(
            event_id,
            draw.label,
            int(body["pred"]),
            draw.color_name,
            draw.minority,
            str(body.get("model_version", "")),
        )

    def flush_labels(self, force: bool = False) -> None:
        now = time.monotonic()
        due: list[dict[str, object]] = []
        while self.pending and (force or self.pending[0][0] <= now):
            _, event_id, label = self.pending.popleft()
            due.append({"id": event_id, "label": label})
        if due and (force or len(due) >= 1):
            self.patchd.post("/v1/labels", json=due).raise_for_status()

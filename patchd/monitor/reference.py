"""The frozen reference each cell is compared with, persisted in the store's kv table.

A reference is either learned from the first ``monitor.reference_window`` labeled events of the
current model (``source="window"``) or taken from the deployed model's held-out evaluation
(``source="evaluation"``). It stays frozen until a promotion resets it
(:class:`patchd.domain.ModelPromoted`). The kv value under ``monitor:reference:<model>`` is
versioned JSON: ``{"version": 1, "status": "frozen" | "learning", ...}``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from patchd.exceptions import StoreError
from patchd.monitor.cells import WindowStats
from patchd.monitor.groups import ALL
from patchd.monitor.window import Traffic
from patchd.stats import wilson_interval
from patchd.store.backend import Connection, put_kv

log = logging.getLogger(__name__)

VERSION = 1
PROFILE_SAMPLE = 2000  # confidences kept per group for the confidence-drift test


def kv_key(model: str) -> str:
    return f"monitor:reference:{model}"


@dataclass(frozen=True)
class CellReference:
    cls: str
    group: str
    n: int
    correct: int

    def lower_bound(self, confidence: float) -> float:
        """One-sided lower confidence bound of the reference accuracy (0 when n == 0)."""
        lo, _ = wilson_interval(self.correct, self.n, 2.0 * confidence - 1.0)
        return lo if self.n else 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


@dataclass(frozen=True)
class GroupProfile:
    """Label-free reference of one subgroup: what drift is measured against."""

    group: str
    n: int
    share: float
    pred_mix: tuple[float, ...]
    confidence: tuple[float, ...]  # a sample of at most PROFILE_SAMPLE values
    embedding_mean: tuple[float, ...] | None = None

    @property
    def mean_confidence(self) -> float:
        return float(np.mean(self.confidence)) if self.confidence else float("nan")


@dataclass(frozen=True)
class Reference:
    model: str
    source: str  # "window" | "evaluation"
    epoch_ts: float  # predictions made at or after this belong to the current model
    created_at: float
    cells: tuple[CellReference, ...]
    profiles: tuple[GroupProfile, ...] = ()
    _index: dict[tuple[str, str], CellReference] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self._index.update({(c.cls, c.group): c for c in self.cells})
        for group in {c.group for c in self.cells}:  # pooled rows an evaluation does not carry
            if (ALL, group) not in self._index:
                members = [c for c in self.cells if c.group == group]
                n, ok = sum(c.n for c in members), sum(c.correct for c in members)
                self._index[(ALL, group)] = CellReference(ALL, group, n, ok)

    def cell(self, cls: str, group: str) -> CellReference | None:
        return self._index.get((cls, group))

    def profile(self, group: str) -> GroupProfile | None:
        return next((p for p in self.profiles if p.group == group), None)

    def to_json(self) -> str:
        data = {k: v for k, v in asdict(self).items() if k != "_index"}
        return json.dumps({"version": VERSION, "status": "frozen", **data})


@dataclass(frozen=True)
class Learning:
    """No reference yet: the monitor is collecting the baseline window of the current model."""

    model: str
    epoch_ts: float

    def to_json(self) -> str:
        return json.dumps({"version": VERSION, "status": "learning", **asdict(self)})


def from_json(raw: str) -> Reference | Learning:
    data = json.loads(raw)
    if data.get("version") != VERSION:
        raise StoreError(
            f"monitor reference has version {data.get('version')!r}, this patchd reads {VERSION}; "
            "delete the kv key to re-learn it"
        )
    if data["status"] == "learning":
        return Learning(data["model"], float(data["epoch_ts"]))
    return Reference(
        model=data["model"],
        source=data["source"],
        epoch_ts=float(data["epoch_ts"]),
        created_at=float(data["created_at"]),
        cells=tuple(CellReference(**c) for c in data["cells"]),
        profiles=tuple(_profile(p) for p in data["profiles"]),
    )


def _profile(p: dict[str, Any]) -> GroupProfile:
    emb = p.get("embedding_mean")
    return GroupProfile(
        group=p["group"],
        n=int(p["n"]),
        share=float(p["share"]),
        pred_mix=tuple(p["pred_mix"]),
        confidence=tuple(p["confidence"]),
        embedding_mean=tuple(emb) if emb else None,
    )


def load(conn: Connection, model: str) -> Reference | Learning | None:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (kv_key(model),)).fetchone()
    return from_json(row[0]) if row else None


def save(conn: Connection, state: Reference | Learning) -> None:
    put_kv(conn, kv_key(state.model), state.to_json(), time.time())


def from_window(
    model: str, stats: WindowStats, epoch_ts: float, profiles: tuple[GroupProfile, ...]
) -> Reference:
    cells = tuple(CellReference(c.cls, c.group, c.n, c.correct) for c in stats.cells if c.n)
    return Reference(model, "window", epoch_ts, time.time(), cells, profiles)


def profiles_from(
    traffic: Traffic, group_names: list[str], n_classes: int, seed: int = 0
) -> tuple[GroupProfile, ...]:
    """Label-free profiles of each subgroup with traffic (a fixed-seed confidence sample)."""
    rng = np.random.default_rng(seed)
    out = []
    for code, name in enumerate(group_names):
        mask = traffic.group == code
        n = int(mask.sum())
        if n == 0:
            continue
        conf = traffic.confidence[mask]
        conf = conf[~np.isnan(conf)]
        if len(conf) > PROFILE_SAMPLE:
            conf = rng.choice(conf, PROFILE_SAMPLE, replace=False)
        mix = np.bincount(traffic.pred[mask], minlength=n_classes)[:n_classes] / n
        out.append(
            GroupProfile(
                name,
                n,
                n / len(traffic),
                tuple(float(x) for x in mix),
                tuple(float(x) for x in conf),
                _embedding_mean(traffic, code),
            )
        )
    return tuple(out)


def _embedding_mean(traffic: Traffic, code: int) -> tuple[float, ...] | None:
    if traffic.embedding is None or traffic.embedding_group is None:
        return None
    rows = traffic.embedding[traffic.embedding_group == code]
    return tuple(float(x) for x in rows.mean(axis=0)) if len(rows) else None


def from_evaluation(
    model: str,
    evaluation: dict[str, Any],
    epoch_ts: float,
    name_group: Callable[[str], str] = str,
) -> Reference | None:
    """A reference from a held-out evaluation (``patchd.evaluation`` cells), or None if unusable.

    ``name_group`` maps the evaluation's group names onto the monitor's (their attribute order).
    """
    cells_data = evaluation.get("cells")
    if not isinstance(cells_data, list) or not cells_data:
        return None
    try:
        cells = tuple(
            CellReference(
                str(c["class_name"]),
                name_group(str(c["group_name"])),
                int(c["n"]),
                int(c["correct"]),
            )
            for c in cells_data
            if int(c["n"]) > 0
        )
    except (KeyError, TypeError, ValueError) as err:
        log.warning("model=%s: the evaluation cannot serve as a reference (%s)", model, err)
        return None
    return Reference(model, "evaluation", epoch_ts, time.time(), cells)

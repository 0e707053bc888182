"""Mined pseudo-groups: the last mining run's failing subgroups, watched in production.

When events carry an ``embedding`` but no attribute names the failing slice, the monitor adds one
attribute, ``mined``, from the mine stage's per-class membership models
(``<artifacts>/runs/<run_id>/mine/mined_groups.json``, written by the ``subgroup`` miner):

- an embedding ``x`` is preprocessed exactly as the miner did (standardised with the fit set's
  mean and standard deviation, then L2-normalised), ``z``;
- class ``c``'s calibrated log-odds of membership is ``z . coef_c + intercept_c`` (balanced prior);
  the event is a ``member`` when it exceeds ``threshold_c`` (the log-odds at which the prior-
  corrected posterior is 0.5 at the held-out share of the subgroup), else ``rest``;
- ``c`` is the event's true class once its label is known (the accuracy cells are per true class
  and the miner fitted each class on its own examples), its predicted class before (the
  label-free views: shares, drift and the estimate, whose cells are per predicted class);
- an event without an embedding, with one of another width, or whose class has no mined subgroup
  gets ``unknown`` (and is counted).

The file is JSON only (no pickle) and is read back with strict validation: a wrong width, a
non-finite number or an unknown class is a :class:`~patchd.exceptions.ValidationError` that names
the file and the field. numpy only: ``patchd serve`` loads it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchd.exceptions import ValidationError

ATTRIBUTE = "mined"
MEMBER, REST, UNKNOWN = "member", "rest", "unknown"
VALUES = (MEMBER, REST, UNKNOWN)
FILE = "mined_groups.json"
SCHEMA = 1
MAX_BYTES = 64 * 1024 * 1024  # a membership file is a few KB per class; refuse anything huge


@dataclass(frozen=True, eq=False)
class MinedDirection:
    """The membership model of one class's failing subgroup (in preprocessed space)."""

    cls: int
    name: str
    coef: np.ndarray  # float64 [dim]
    intercept: float  # with coef: calibrated log-odds of membership at a balanced prior
    threshold: float  # member when the log-odds exceed this
    confidence: float  # the miner's stated confidence of the group, 0..1
    description: str  # the miner's readable description

    def text(self) -> str:
        """One readable line (the miner's descriptions start with the class name: dropped)."""
        what = self.description.removeprefix(f"{self.name}: ")
        return f"class {self.name}, mined failure mode: {what} (confidence {self.confidence:.2f})"


@dataclass(frozen=True, eq=False)
class MinedGroups:
    """Every mined class of one run, with the preprocessing shared by all of them."""

    model: str
    run_id: str
    incumbent_sha256: str  # the model whose embeddings the directions live in
    embedding: str  # what was embedded ("classifier-features")
    mean: np.ndarray  # float64 [dim]
    std: np.ndarray  # float64 [dim], > 0
    directions: tuple[MinedDirection, ...]
    source: str = ""  # the file it was read from ("" before it is written)
    _by_class: dict[int, MinedDirection] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_class", {d.cls: d for d in self.directions})

    @property
    def dim(self) -> int:
        return len(self.mean)

    def direction(self, cls: int) -> MinedDirection | None:
        return self._by_class.get(cls)

    def decision(self, x: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """Each row's log-odds of membership in its class's subgroup (nan: class not mined)."""
        w = (np.asarray(x, np.float64) - self.mean) / self.std
        z = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        out = np.full(len(z), np.nan)
        for d in self.directions:
            rows = cls == d.cls
            out[rows] = z[rows] @ d.coef + d.intercept
        return out

    def assign(self, x: np.ndarray, cls: np.ndarray) -> np.ndarray:
        """``member`` / ``rest`` / ``unknown`` (class not mined, or a non-finite row) per row."""
        log_odds = self.decision(x, np.asarray(cls))
        threshold = np.full(len(log_odds), np.nan)
        for d in self.directions:
            threshold[np.asarray(cls) == d.cls] = d.threshold
        out = np.full(len(log_odds), UNKNOWN, dtype=object)
        known = np.isfinite(log_odds)
        out[known] = np.where(log_odds[known] > threshold[known], MEMBER, REST)
        return out

    def descriptions(self) -> tuple[str, ...]:
        return tuple(d.text() for d in self.directions)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "run_id": self.run_id,
            "incumbent_sha256": self.incumbent_sha256,
            "embedding": self.embedding,
            "embedding_dim": self.dim,
            "preprocess": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "classes": [
                {
                    "class": d.cls,
                    "name": d.name,
                    "coef": d.coef.tolist(),
                    "intercept": d.intercept,
                    "threshold": d.threshold,
                    "confidence": d.confidence,
                    "description": d.description,
                }
                for d in self.directions
            ],
        }

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False))
        return path


def read(path: Path, class_names: list[str] | tuple[str, ...]) -> MinedGroups:
    """The membership file at ``path``, validated against the model's classes."""
    where = str(path)
    try:
        size = path.stat().st_size
        text = path.read_text(encoding="utf-8") if size <= MAX_BYTES else ""
    except OSError as err:
        raise bad_file(where, "file", f"cannot be read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise bad_file(where, "file", f"is not UTF-8 text ({err})") from err
    if size > MAX_BYTES:
        raise bad_file(where, "file", f"is larger than {MAX_BYTES} bytes")
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except ValueError as err:  # JSONDecodeError, or NaN / Infinity
        raise bad_file(where, "file", f"is not valid JSON ({err})") from err
    return _parse(doc, where, tuple(class_names))


def _parse(doc: Any, where: str, names: tuple[str, ...]) -> MinedGroups:
    doc = _object(doc, where, "(root)")
    if doc.get("schema") != SCHEMA:
        raise bad_file(where, "schema", f"{doc.get('schema')!r} is not {SCHEMA}")
    dim = doc.get("embedding_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise bad_file(where, "embedding_dim", f"{dim!r} is not a positive integer")
    pre = _object(doc.get("preprocess"), where, "preprocess")
    mean = _vector(pre.get("mean"), dim, where, "preprocess.mean")
    std = _vector(pre.get("std"), dim, where, "preprocess.std")
    if (std <= 0).any():
        raise bad_file(where, "preprocess.std", "has a value <= 0")
    classes = doc.get("classes")
    if not isinstance(classes, list):
        raise bad_file(where, "classes", "is not a list")
    directions = tuple(_direction(c, i, dim, where, names) for i, c in enumerate(classes))
    if len({d.cls for d in directions}) != len(directions):
        raise bad_file(where, "classes", "names a class twice")
    return MinedGroups(
        model=_text(doc.get("model"), where, "model"),
        run_id=_text(doc.get("run_id"), where, "run_id"),
        incumbent_sha256=_text(doc.get("incumbent_sha256"), where, "incumbent_sha256"),
        embedding=_text(doc.get("embedding"), where, "embedding"),
        mean=mean,
        std=std,
        directions=directions,
        source=where,
    )


def _direction(raw: Any, i: int, dim: int, where: str, names: tuple[str, ...]) -> MinedDirection:
    at = f"classes[{i}]"
    raw = _object(raw, where, at)
    cls = raw.get("class")
    if not isinstance(cls, int) or isinstance(cls, bool) or not 0 <= cls < len(names):
        raise bad_file(where, f"{at}.class", f"{cls!r} is not a class index of {list(names)}")
    name = _text(raw.get("name"), where, f"{at}.name")
    if name != names[cls]:
        raise bad_file(where, f"{at}.name", f"{name!r} is not class {cls} ({names[cls]!r})")
    confidence = _number(raw.get("confidence"), where, f"{at}.confidence")
    if not 0.0 <= confidence <= 1.0:
        raise bad_file(where, f"{at}.confidence", f"{confidence} is not in 0..1")
    return MinedDirection(
        cls=cls,
        name=name,
        coef=_vector(raw.get("coef"), dim, where, f"{at}.coef"),
        intercept=_number(raw.get("intercept"), where, f"{at}.intercept"),
        threshold=_number(raw.get("threshold"), where, f"{at}.threshold"),
        confidence=confidence,
        description=_text(raw.get("description"), where, f"{at}.description"),
    )


def bad_file(where: str, name: str, message: str) -> ValidationError:
    return ValidationError("bad_mined_groups", f"{where}: {name} {message}", field=None)


def _no_constant(token: str) -> float:
    raise ValueError(f"has the non-finite number {token}")


def _object(raw: Any, where: str, name: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise bad_file(where, name, "is not a JSON object")
    return raw


def _text(raw: Any, where: str, name: str) -> str:
    if not isinstance(raw, str):
        raise bad_file(where, name, f"{raw!r} is not a string")
    return raw


def _number(raw: Any, where: str, name: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise bad_file(where, name, f"{raw!r} is not a finite number")
    return float(raw)


def _vector(raw: Any, dim: int, where: str, name: str) -> np.ndarray:
    if not isinstance(raw, list) or len(raw) != dim:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise bad_file(where, name, f"has {got} values, embedding_dim is {dim}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw):
        raise bad_file(where, name, "holds a value that is not a number")
    out = np.asarray(raw, np.float64)
    if not np.isfinite(out).all():
        raise bad_file(where, name, "holds a NaN or infinite value")
    return out


@dataclass(frozen=True)
class MinedStatus:
    """What ``status`` and ``GET /v1/groups`` show of the mined pseudo-groups."""

    active: bool
    note: str  # where they come from, or why none is in use
    source: str = ""
    run_id: str = ""
    incumbent_sha256: str = ""
    embedding_dim: int = 0
    descriptions: tuple[str, ...] = ()
    skipped: tuple[tuple[str, int], ...] = ()  # labeled events left ``unknown``, by reason

    @classmethod
    def of(cls, mined: MinedGroups, note: str, skipped: dict[str, int]) -> MinedStatus:
        return cls(
            active=True,
            note=note,
            source=mined.source,
            run_id=mined.run_id,
            incumbent_sha256=mined.incumbent_sha256,
            embedding_dim=mined.dim,
            descriptions=mined.descriptions(),
            skipped=tuple(sorted(skipped.items())),
        )

    @classmethod
    def inactive(cls, note: str) -> MinedStatus:
        return cls(active=False, note=note)

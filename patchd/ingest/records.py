"""Prediction events and labels (schema version 1, docs/capture.md): parsing and validation.

A prediction event::

    {"id": "r-1", "ts": "2026-11-23T10:00:00Z", "model": "skin", "model_version": "sha256:...",
     "pred": 1, "probs": [0.1, 0.9], "groups": {"site": "B"},
     "input": {"uri": "file:///srv/images/r-1.png"}, "embedding": null, "label": null}

Required: ``id`` (string or integer) and ``pred`` (class index, or class name; a decimal string
that is not a class name is read as an index). ``model`` defaults
to ``config.model.name`` and must equal it (this parser is one model's; :mod:`patchd.ingest.routing`
routes events by ``model`` when several are configured); ``ts`` (ISO 8601
or unix seconds) defaults to the arrival time. Unknown top-level fields are ignored; ``schema``,
when present, must be 1. A label is ``{"id": ..., "label": ..., "model"?: ...}``.

``input`` is a ``file://`` URI or an absolute path that must resolve (symlinks followed) inside
``sources.allowed_roots``, or ``{"base64": ...}`` (PNG/JPEG bytes that decode as an image, see
:mod:`patchd.ingest.inline`), replaced by the file URI ``<artifacts>/inputs/<sha256>.<ext>``; the
file is written only once the record passed validation (:meth:`EventParser.parse` returns the
planned file, the pipeline writes it).

Each invalid record raises :class:`~patchd.exceptions.ValidationError` with a reason code from
:data:`REASONS`; :func:`validate_each` (the one validation boundary every source goes through)
turns it into a :class:`RecordError` and keeps the other records. It also turns any other
exception a hostile record provokes into a rejection: nothing a record holds escapes as a 5xx.
Records are ``NamedTuple``s (immutable, typed, and in the column order of the insert, so the
writer hands them to ``executemany`` without copying: 1M events must not cost 1M dict copies).
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import orjson

from patchd.config import Config, GroupsConfig
from patchd.exceptions import ValidationError
from patchd.ingest.fields import (
    FLOAT32_MAX,
    MAX_EMBEDDING_DIMS,
    MAX_ID_CHARS,
    MAX_TS,
    check_inside,  # noqa: F401 - re-exported (plugins.sources.cloudevents)
    kind_of,
    parse_embedding,
    parse_floats,
    parse_ident,
    parse_optional_str,
    parse_timestamp,
    resolve_input_path,  # noqa: F401 - re-exported (plugins.sources.cloudevents)
)
from patchd.ingest.inline import (
    InlineInput,
    InputStore,
    check_image,  # noqa: F401 - re-exported (plugins.sources.cloudevents)
)
from patchd.ingest.input_paths import InputResolver

log = logging.getLogger(__name__)

REASONS = (
    "malformed_json",
    "missing_field",
    "wrong_type",
    "invalid_value",
    "unknown_model",
    "duplicate",
    "path_not_allowed",
    "too_large",
    "queue_full",
    "too_many_events",  # a body with more than sources.max_events_per_request records
    "inputs_full",  # <artifacts>/inputs holds sources.max_inputs_bytes
    "pending_full",  # store.max_pending_labels labels already wait for their prediction
)
MAX_GROUP_VALUE_CHARS = 64
UNKNOWN_GROUP_VALUE = "unknown"
NO_GROUPS_KEY = "all"


class Prediction(NamedTuple):
    """One validated prediction event, in the column order of ``predictions``."""

    model: str
    id: str
    ts: float
    model_version: str | None
    pred: int
    confidence: float | None
    probs: bytes | None  # float32 array
    group_key: str
    groups: str  # JSON object of the capped attributes
    input_uri: str | None
    embedding: bytes | None  # float32 array
    source: str
    ingested_at: float
    label: int | None


class Label(NamedTuple):
    model: str
    id: str
    label: int
    received_at: float


@dataclass(frozen=True)
class RecordError:
    """Why record ``index`` of a batch (0-based; the line in NDJSON and tail files) was rejected."""

    index: int
    reason: str
    message: str


def split_body(body: bytes, content_type: str = "") -> tuple[list[Any], list[RecordError]]:
    """A JSON array, one JSON object, or NDJSON → (records, per-line errors).

    A JSON array that does not parse is one ``malformed_json`` error for the whole body (index -1);
    in NDJSON each bad line is its own error and the good lines are kept.
    """
    stripped = body.lstrip()
    if stripped[:1] == b"[" and "ndjson" not in content_type:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError as err:
            return [], [RecordError(-1, "malformed_json", f"body is not valid JSON: {err}")]
        if isinstance(parsed, list):
            return parsed, []
        return [parsed], []
    return split_lines(body.split(b"\n"))


def split_lines(lines: list[bytes], first_index: int = 0) -> tuple[list[Any], list[RecordError]]:
    """Parse NDJSON lines; ``records[i]`` is line i (blank and bad lines are placeholders)."""
    records: list[Any] = []
    errors: list[RecordError] = []
    loads, append = orjson.loads, records.append
    for i, line in enumerate(lines, first_index):
        try:
            append(loads(line))
        except orjson.JSONDecodeError as err:
            append(_MALFORMED)  # blank and bad lines keep later indices equal to line numbers
            if line.strip():
                message = f"line {i + 1} is not valid JSON: {err}"
                errors.append(RecordError(i, "malformed_json", message))
    return records, errors


class _Malformed:
    """Placeholder keeping indices aligned with the input for blank or unparsable lines."""


_MALFORMED = _Malformed()
PLACEHOLDER: object = _MALFORMED  # for callers that drop a record but keep indices aligned


def is_malformed(record: object) -> bool:
    return record is _MALFORMED


_NO_GROUPS: Mapping[str, object] = MappingProxyType({})


class GroupCap:
    """Maps an event's ``groups`` to bounded values: at most ``max_values`` per attribute.

    Values are admitted first come, first served (or fixed by ``groups.values``); later new values
    go to the overflow bucket (``other``). A missing attribute is ``unknown``. Thread-safe.
    """

    def __init__(self, config: GroupsConfig, admitted: dict[str, list[str]] | None = None) -> None:
        self.attributes = tuple(config.attributes)
        self.max_values = config.max_values
        self.overflow = config.overflow
        self._fixed = {a: frozenset(v) for a, v in config.values.items()}
        self._admitted: dict[str, set[str]] = {a: set() for a in self.attributes}
        for attr, values in (admitted or {}).items():
            if attr in self._admitted and attr not in self._fixed:
                self._admitted[attr].update(values[: self.max_values])
        self._lock = threading.Lock()
        # keys: the capped values, and the raw ones (str or None) that fast_key looks up
        self._memo: dict[tuple[object, ...], tuple[str, str]] = {}
        self.version = 0  # bumped when a value is admitted (the pipeline persists the set)

    def snapshot(self) -> dict[str, list[str]]:
        with self._lock:
            return {a: sorted(v) for a, v in self._admitted.items() if a not in self._fixed}

    def key(self, groups: object) -> tuple[str, str]:
        """``groups`` object → (group_key ``"a=x,b=y"``, JSON of the capped mapping)."""
        if not self.attributes:
            return NO_GROUPS_KEY, "{}"
        if groups is None:
            groups = {}
        elif not isinstance(groups, dict):
            raise ValidationError("wrong_type", "must be an object", field="groups")
        original = tuple(groups.get(a) for a in self.attributes)
        raw = tuple(_group_value(a, v) for a, v in zip(self.attributes, original, strict=True))
        found = self._memo.get(raw)
        if found is None:
            found = self._capped(raw)
        if all(v is None or type(v) is str for v in original):
            self._memo[original] = found  # lets fast_key hit missing attrs
        return found

    def fast_key(self, groups: object) -> tuple[str, str] | None:
        """Like :meth:`key` for string values already seen; None otherwise (use :meth:`key`)."""
        if not self.attributes:
            return NO_GROUPS_KEY, "{}"
        if groups is None:
            groups = _NO_GROUPS
        elif type(groups) is not dict:
            return None
        try:  # a list or object value is unhashable: the full path rejects it by name
            if len(self.attributes) == 1:
                return self._memo.get((groups.get(self.attributes[0]),))
            return self._memo.get(tuple(groups.get(a) for a in self.attributes))
        except TypeError:
            return None

    def _capped(self, raw: tuple[str, ...]) -> tuple[str, str]:
        values = tuple(self._cap(a, v) for a, v in zip(self.attributes, raw, strict=True))
        key = ",".join(f"{a}={v}" for a, v in zip(self.attributes, values, strict=True))
        found = (key, orjson.dumps(dict(zip(self.attributes, values, strict=True))).decode())
        if len(self._memo) > 50_000:
            self._memo.clear()
        self._memo[raw] = found
        return found

    def _cap(self, attr: str, value: str) -> str:
        if value == UNKNOWN_GROUP_VALUE:
            return value
        fixed = self._fixed.get(attr)
        if fixed is not None:
            return value if value in fixed else self.overflow
        admitted = self._admitted[attr]
        if value in admitted:
            return value
        with self._lock:
            if len(admitted) >= self.max_values:
                return self.overflow
            admitted.add(value)
            self.version += 1
            return value


def _group_value(attr: str, value: object) -> str:
    if value is None:
        return UNKNOWN_GROUP_VALUE
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        text = str(value)
    elif isinstance(value, float) and -FLOAT32_MAX <= value <= FLOAT32_MAX:
        text = repr(value)
    else:
        raise ValidationError(
            "wrong_type",
            f"must be a string or number, got {type(value).__name__}",
            field=f"groups.{attr}",
        )
    if len(text) > MAX_GROUP_VALUE_CHARS:
        raise ValidationError(
            "too_large", f"longer than {MAX_GROUP_VALUE_CHARS} characters", field=f"groups.{attr}"
        )
    if "," in text or "=" in text or not text:
        raise ValidationError(
            "invalid_value", f"{text!r} is empty or contains ',' or '='", field=f"groups.{attr}"
        )
    return text


def _clean_probs(probs: object, n: int) -> bool:
    """``probs`` is a list of ``n`` floats in [0, 1] (a plain loop: no generator frame)."""
    if type(probs) is not list or len(probs) != n:
        return False
    for v in probs:  # noqa: SIM110 - all(<genexpr>) costs a frame per event
        if type(v) is not float or not 0.0 <= v <= 1.0:  # also false for NaN
            return False
    return True


class EventParser:
    """Validates schema-v1 dicts into :class:`Prediction` / :class:`Label` records."""

    def __init__(self, config: Config, group_cap: GroupCap | None = None) -> None:
        self.model = config.model.name
        self.class_names = tuple(config.model.class_names)
        self._class_index = {name: i for i, name in enumerate(self.class_names)}
        self.n_classes = len(self.class_names)
        self.groups_config = config.groups
        self.groups = group_cap or GroupCap(config.groups)
        self.roots = tuple(Path(r).resolve() for r in config.sources.allowed_roots)
        self.inputs = InputResolver(self.roots)
        self.inputs_dir = config.artifacts_root / "inputs"
        self.max_inline_bytes = config.sources.max_inline_bytes
        sources = config.sources
        self.input_store = InputStore(
            self.inputs_dir, sources.max_inputs_bytes, sources.max_image_pixels
        )

    def prediction(self, obj: object, source: str, now: float | None = None) -> Prediction:
        """Validate one event and write its inline input; raises :class:`ValidationError`."""
        record, inline = self.parse(obj, source, now)
        if inline is not None:
            self.input_store.write([inline])
        return record

    def parse(
        self, obj: object, source: str, now: float | None = None
    ) -> tuple[Prediction, InlineInput | None]:
        """Validate one event; the inline input file it needs (not written yet), if any."""
        planned: list[InlineInput] = []
        record = self.planned(obj, source, time.time() if now is None else now, planned)
        return record, planned[0] if planned else None

    def planned(
        self, obj: object, source: str, now: float, planned: list[InlineInput]
    ) -> Prediction:
        """Validate one event; its inline input, if any, is appended to ``planned``."""
        fast = self._fast(obj, source, now)
        return fast if fast is not None else self._full(obj, source, now, planned)

    def _fast(self, obj: object, source: str, now: float) -> Prediction | None:
        """The common clean event, checked in one frame (ingest runs at 100k events/s).

        Returns None for anything unusual (inputs, embeddings, a bad field...): the full path
        then validates it and names the error. It never accepts what the full path rejects.
        """
        if type(obj) is not dict:
            return None
        get = obj.get
        ident, pred, ts, model = get("id"), get("pred"), get("ts"), get("model")
        n = self.n_classes
        if type(ident) is not str or not 0 < len(ident) <= MAX_ID_CHARS:
            return None
        if (
            (model is not None and model != self.model)
            or type(pred) is not int
            or not 0 <= pred < n
        ):
            return None
        if type(ts) is float:
            if not 0.0 < ts < MAX_TS:
                return None
        elif ts is None:
            ts = now
        else:
            try:
                ts = parse_timestamp(ts, now)
            except ValidationError:
                return None
        label, version = get("label"), get("model_version")
        if label is not None and (type(label) is not int or not 0 <= label < n):
            return None
        if version is not None and (type(version) is not str or len(version) > 128):
            return None
        if get("schema") is not None or get("embedding") is not None:
            return None
        probs = get("probs")
        blob = top = None
        if probs is not None:
            if not _clean_probs(probs, n):
                return None
            blob, top = array("f", probs).tobytes(), max(probs)
        found = self.groups.fast_key(get("groups"))
        uri = get("input")
        if found is None or (uri is not None and (uri := self._fast_input(uri)) is None):
            return None
        row = (
            self.model,
            ident,
            ts,
            version,
            pred,
            top,
            blob,
            *found,
            uri,
            None,
            source,
            now,
            label,
        )
        return tuple.__new__(Prediction, row)

    def _fast_input(self, value: object) -> str | None:
        """The file URI of a path or ``{"uri": path}`` input; None for anything else or an error
        (the full path then names it)."""
        if type(value) is dict and len(value) == 1:
            value = value.get("uri")
        if type(value) is not str:
            return None
        try:
            return self.inputs.file_uri(value)
        except ValidationError:
            return None

    def _full(
        self, obj: object, source: str, now: float, planned: list[InlineInput] | None = None
    ) -> Prediction:
        planned = [] if planned is None else planned
        if not isinstance(obj, dict):
            raise ValidationError("wrong_type", f"an event must be an object, got {kind_of(obj)}")
        schema = obj.get("schema")
        if schema is not None and schema != 1:
            raise ValidationError("invalid_value", f"unsupported schema {schema!r}", field="schema")
        probs, confidence = self._probs(obj.get("probs"))
        group_key, groups = self.groups.key(obj.get("groups"))
        return Prediction(
            self._model(obj.get("model")),
            parse_ident(obj.get("id")),
            parse_timestamp(obj.get("ts"), now),
            parse_optional_str(obj.get("model_version"), "model_version", 128),
            self._cls(obj.get("pred"), "pred", required=True),  # type: ignore[arg-type]
            confidence,
            probs,
            group_key,
            groups,
            self._input(obj.get("input"), planned),
            parse_embedding(obj.get("embedding")),
            source,
            now,
            self._cls(obj.get("label"), "label", required=False),
        )

    def label(self, obj: object, now: float | None = None) -> Label:
        if not isinstance(obj, dict):
            raise ValidationError("wrong_type", f"a label must be an object, got {kind_of(obj)}")
        return Label(
            self._model(obj.get("model")),
            parse_ident(obj.get("id")),
            self._cls(obj.get("label"), "label", required=True),  # type: ignore[arg-type]
            time.time() if now is None else now,
        )

    def _model(self, value: object) -> str:
        if value is None or value == self.model:
            return self.model
        if not isinstance(value, str):
            raise ValidationError(
                "wrong_type", f"must be a string, got {kind_of(value)}", field="model"
            )
        raise ValidationError(
            "unknown_model",
            f"{value[:64]!r} is not the model this serve watches ({self.model!r}); "
            "run one serve per model or fix model.name in the config",
            field="model",
        )

    def _cls(self, value: object, field: str, *, required: bool) -> int | None:
        if type(value) is int:
            if 0 <= value < self.n_classes:
                return value
            raise ValidationError(
                "invalid_value", f"class index {value} outside 0..{self.n_classes - 1}", field=field
            )
        if value is None:
            if required:
                raise ValidationError("missing_field", "is required", field=field)
            return None
        if isinstance(value, str):
            index = self._class_index.get(value)
            if index is None and value.isascii() and value.isdigit():
                # TorchServe's top-k names without index_to_name.json, numpy ints as text
                # (BentoML): a decimal string that is not a class name is a class index
                return self._cls(int(value), field, required=required)
            if index is None:
                raise ValidationError(
                    "invalid_value", f"{value[:64]!r} is not one of {self.class_names}", field=field
                )
            return index
        raise ValidationError(
            "wrong_type", f"must be a class index or name, got {kind_of(value)}", field=field
        )

    def _probs(self, value: object) -> tuple[bytes | None, float | None]:
        if value is None:
            return None, None
        floats = parse_floats(value, "probs", MAX_EMBEDDING_DIMS)
        if len(floats) != self.n_classes:
            raise ValidationError(
                "invalid_value",
                f"has {len(floats)} values, expected {self.n_classes}",
                field="probs",
            )
        top = max(floats)
        if min(floats) < 0.0 or top > 1.0:
            raise ValidationError(
                "invalid_value", "probabilities must lie in [0, 1]", field="probs"
            )
        return array("f", floats).tobytes(), top

    def _input(self, value: object, planned: list[InlineInput]) -> str | None:
        if value is None:
            return None
        if isinstance(value, str):
            return self._local_uri(value)
        if not isinstance(value, dict):
            raise ValidationError(
                "wrong_type", f"must be an object, got {kind_of(value)}", field="input"
            )
        if "base64" in value:
            inline = self._plan_inline(value["base64"])
            planned.append(inline)
            return inline.uri
        uri = value.get("uri", value.get("path"))
        if not isinstance(uri, str):
            raise ValidationError("missing_field", "needs 'uri' or 'base64'", field="input")
        return self._local_uri(uri)

    def _local_uri(self, uri: str) -> str:
        return self.inputs.file_uri(uri)

    def _plan_inline(self, data: object) -> InlineInput:
        if not isinstance(data, str):
            raise ValidationError("wrong_type", "must be a base64 string", field="input.base64")
        if len(data) > self.max_inline_bytes * 4 // 3 + 4:
            raise ValidationError(
                "too_large",
                f"inline input over {self.max_inline_bytes} bytes",
                field="input.base64",
            )
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(
                "invalid_value", "not valid base64", field="input.base64"
            ) from None
        if len(raw) > self.max_inline_bytes:
            raise ValidationError(
                "too_large",
                f"inline input over {self.max_inline_bytes} bytes",
                field="input.base64",
            )
        return self.input_store.plan(raw)


_UNEXPECTED: set[str] = set()  # exception kinds the boundary has logged with a traceback


@dataclass(frozen=True)
class Validated:
    """The records of a batch that passed, the planned inline inputs, and the rejections."""

    rows: list[Any]
    inline: list[InlineInput]
    errors: list[RecordError]


def validate_each(
    records: Iterable[object],
    check: Callable[..., Any],
    args: tuple[Any, ...] = (),
    *,
    first_index: int = 0,
    errors: Iterable[RecordError] = (),
    planned: list[InlineInput] | None = None,
    max_inline_bytes: int | None = None,
) -> Validated:
    """The validation boundary: ``check(record, *args)`` each record; never raises.

    A :class:`ValidationError` names its reason; any other exception (a parser bug a hostile
    record found: recursion, a huge number, a type no branch expected) is ``invalid_value``,
    logged. ``check`` appends the inline inputs it plans to ``planned`` (also in ``args``);
    those beyond ``max_inline_bytes`` in total reject their records (``too_large``).
    Placeholders (blank or malformed lines) are skipped. (One call per record, no wrapper: the
    loop runs at ingest rate.)
    """
    inline = planned if planned is not None else []
    out = Validated([], inline, list(errors))
    rows, append = out.rows, out.rows.append
    budget = max_inline_bytes if max_inline_bytes is not None else 1 << 62
    seen = 0
    for i, record in enumerate(records, first_index):
        if record is _MALFORMED:
            continue
        try:
            append(check(record, *args))
        except ValidationError as err:
            out.errors.append(RecordError(i, err.reason, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - the boundary: a record never escapes as a 5xx
            first = type(err).__name__ not in _UNEXPECTED  # a traceback once per kind
            _UNEXPECTED.add(type(err).__name__)
            log.warning("record %d could not be validated (%r)", i, err, exc_info=first)
            message = f"could not be read ({type(err).__name__}: {str(err)[:120]})"
            out.errors.append(RecordError(i, "invalid_value", message))
            continue
        if len(inline) > seen:  # this record planned an inline input
            seen = len(inline)
            budget -= len(inline[-1].data)
            if budget < 0:
                message = "inline inputs of this batch over sources.max_inline_bytes_per_request"
                out.errors.append(RecordError(i, "too_large", message))
                rows.pop()
                inline.pop()
                seen -= 1
    return out

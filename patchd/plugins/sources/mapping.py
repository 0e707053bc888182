"""Existing log formats → schema-v1 events, without code: the tail source's ``kind: bentoml``
and ``kind: mapping`` call :func:`map_record` on every JSON line before validation.

A mapping is ``{schema-v1 field: source}`` (config ``sources.tail[].mapping``). Fields:
``id``, ``ts``, ``model``, ``model_version``, ``pred``, ``probs``, ``label``, ``embedding``,
``input`` (a URI string or an ``{"uri"}``/``{"base64"}`` object), ``input.uri``,
``input.base64``, ``groups`` (a whole object) and ``groups.<attr>`` (one attribute).
A source is a dotted path into the raw record (``meta.request.id``; list items by index,
``outputs.0.data``), several paths separated by ``|`` (the first one present wins), or a literal
after ``=`` (``"=skin"``). A path that is absent leaves the field unset; validation then says
what is missing.

``kind: bentoml`` reads BentoML's default monitor files
(``<log_path>/<monitor name>/data/data.<worker>.log``, rotated daily to
``data.<worker>.log.<YYYY-MM-DD>``; tail ``.../data/data.*.log*``). One line per ``mon.log`` row::

    {"pred": 1, "probs": [0.2, 0.8], "input_uri": "file:///srv/images/1.png", "site": "B",
     "timestamp": "2026-11-23T19:00:00.123456", "request_id": "1234567890", "trace_id": "0"}

i.e. the ``name=`` of each ``mon.log(...)`` call as a key, plus BentoML's ``timestamp``
(``datetime.now().isoformat()``: naive *local* time of the writer; see :func:`localize`),
``request_id`` and ``trace_id`` (both strings). Defaults: ``id`` ← ``request_id``, ``ts`` ←
``timestamp``, ``pred`` ← ``pred|prediction|label``, ``probs`` ← ``probs|probabilities``,
``input.uri`` ← ``input_uri|image_uri``, ``model_version`` ← ``model_version``; every other
scalar column is offered as a group attribute (serve keeps only ``groups.attributes``).
``mapping`` entries override these defaults. When one request logs several rows (a batch),
log a per-row id column and map ``id`` to it: BentoML's ``request_id`` repeats within a request
(and is ``"None"`` outside a request, which is rejected as a missing id).

BentoML's JSON formatter (python-json-logger) writes what ``json`` cannot encode as ``str(value)``:
a numpy integer arrives as ``"2"``, an array as ``"[0.1 0.2 0.7]"`` (wrapped with newlines when
long), a list of numpy floats as ``["0.1", "0.9"]``. :func:`numeric_list` reads those back for
``probs`` and ``embedding``; a class given as a decimal string is read by serve as a class index
when it is not one of ``model.class_names``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, tzinfo
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from patchd.exceptions import ConfigError, ValidationError

FIELDS = frozenset(
    {
        "id",
        "ts",
        "model",
        "model_version",
        "pred",
        "probs",
        "label",
        "embedding",
        "input",
        "input.uri",
        "input.base64",
        "groups",
    }
)
BENTOML_DEFAULTS: dict[str, str] = {
    "id": "request_id",
    "ts": "timestamp",
    "pred": "pred|prediction|label",
    "probs": "probs|probabilities",
    "input.uri": "input_uri|image_uri",
    "model_version": "model_version",
}
BENTOML_RESERVED = frozenset({"timestamp", "request_id", "trace_id"})  # DefaultMonitor's columns
LOCAL = "local"  # the zone name meaning "the machine's local zone"
NUMERIC_FIELDS = ("probs", "embedding")
MAX_NUMPY_TEXT = 1 << 20
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?(?:nan|inf)")
_MISSING = object()

Source = tuple[tuple[str, ...], ...] | str  # alternatives of split paths, or a literal


def map_record(
    kind: str, mapping: Mapping[str, str], raw: dict[str, Any], zone: str | None = None
) -> dict[str, Any]:
    """Map one raw JSON record to a schema-v1 event dict (see the module docstring).

    ``zone`` (an IANA name or ``"local"``) is the zone a naive ``ts`` was written in; None leaves
    ``ts`` as it is (serve reads a naive time as UTC). ``kind: bentoml`` reads numpy text back.
    """
    if not isinstance(raw, dict):
        raise ValidationError("wrong_type", f"a {kind} log line must be a JSON object")
    compiled = compile_mapping(kind, tuple(sorted(mapping.items())))
    event: dict[str, Any] = {}
    used: set[str] = set()
    for target, source in compiled:
        value = _resolve(raw, source, used)
        if value is not _MISSING:
            _assign(event, target, value)
    if zone is not None and "ts" in event:
        event["ts"] = localize(event["ts"], zone)
    if kind == "bentoml":
        _bentoml_values(event)
        _bentoml_groups(raw, event, used)
    return event


@lru_cache(maxsize=32)
def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"sources.tail[].timezone {name!r} is not a time zone") from None


def localize(value: object, zone: str) -> object:
    """A naive ISO time written in ``zone`` → the same instant with its UTC offset (ISO text).

    BentoML's monitor writes ``datetime.now().isoformat()``: the writer's wall clock without an
    offset. A time that already has an offset, or is not ISO text, is returned unchanged (serve
    validates it). In a DST fold the first occurrence is taken (the text cannot say which).
    """
    if not isinstance(value, str):
        return value
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value
    if parsed.tzinfo is not None:
        return value
    aware = parsed.astimezone() if zone == LOCAL else parsed.replace(tzinfo=_zone(zone))
    return aware.isoformat()


def numeric_list(value: object, field: str) -> object:
    """numpy's text forms back to a list of floats; other values are returned unchanged.

    ``"[0.1 0.2 0.7]"`` (``str(ndarray)``, also wrapped over lines, or one row ``"[[...]]"``) and
    ``["0.1", "0.9"]`` (a list of numpy scalars) become ``[0.1, 0.2, 0.7]`` / ``[0.1, 0.9]``. An
    array numpy printed summarized (``...``, over 1000 values) cannot be read back: rejected.
    """
    if isinstance(value, list):
        if value and all(isinstance(v, str) for v in value):
            return [_number(v, field) for v in value]
        return value
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return value
    if len(value) > MAX_NUMPY_TEXT:
        raise ValidationError("too_large", "numpy array text over 1 MiB", field=field)
    if "..." in value:
        raise ValidationError(
            "invalid_value",
            "numpy printed a summarized array ('...'); log it with .tolist()",
            field=field,
        )
    body = value.strip()
    while body.startswith("[[") and body.endswith("]]"):
        body = body[1:-1].strip()
    if "[" in body[1:] or not body.endswith("]"):
        raise ValidationError(
            "invalid_value", "a numpy array of more than one row cannot be probs", field=field
        )
    return [_number(v, field) for v in body[1:-1].replace(",", " ").split()]


def _number(text: str, field: str) -> float:
    if not _NUMBER.fullmatch(text.strip()):
        raise ValidationError("wrong_type", f"{text[:32]!r} is not a number", field=field)
    return float(text)


def _bentoml_values(event: dict[str, Any]) -> None:
    for field in NUMERIC_FIELDS:
        if field in event:
            event[field] = numeric_list(event[field], field)
    if event.get("id") == "None":
        raise ValidationError(
            "missing_field",
            "request_id is 'None' (mon.log ran outside a request): log a per-row id column and "
            "map id to it",
            field="id",
        )


@lru_cache(maxsize=64)
def compile_mapping(
    kind: str, items: tuple[tuple[str, str], ...]
) -> tuple[tuple[str, Source], ...]:
    """Validate and pre-split a mapping once (cached); raises :class:`ConfigError`."""
    if kind not in ("bentoml", "mapping"):
        raise ConfigError(f"sources.tail kind {kind!r} has no mapping; use 'bentoml' or 'mapping'")
    merged = {**BENTOML_DEFAULTS, **dict(items)} if kind == "bentoml" else dict(items)
    if kind == "mapping" and "pred" not in merged:
        raise ConfigError("sources.tail[].mapping needs at least 'pred' (and usually 'id')")
    out = []
    for target, spec in merged.items():
        if target not in FIELDS and not target.startswith("groups."):
            raise ConfigError(
                f"sources.tail[].mapping key {target!r} is not a schema-v1 field; use one of "
                f"{sorted(FIELDS)} or groups.<attribute>"
            )
        if not isinstance(spec, str) or not spec:
            raise ConfigError(f"sources.tail[].mapping.{target} must be a non-empty path string")
        out.append((target, _source(spec)))
    return tuple(out)


def check_mapping(kind: str, mapping: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` for a bad mapping (call at startup to fail early)."""
    compile_mapping(kind, tuple(sorted(mapping.items())))


def _source(spec: str) -> Source:
    if spec.startswith("="):
        return spec[1:]
    return tuple(tuple(alt.strip().split(".")) for alt in spec.split("|") if alt.strip())


def _resolve(raw: Any, source: Source, used: set[str]) -> Any:
    if isinstance(source, str):
        return source
    for path in source:
        value = _walk(raw, path)
        if value is not _MISSING:
            used.add(path[0])
            return value
    return _MISSING


def _walk(node: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            return _MISSING
        if node is _MISSING:
            return _MISSING
    return node


def _assign(event: dict[str, Any], target: str, value: Any) -> None:
    head, _, attr = target.partition(".")
    if not attr:
        event[head] = value
        return
    inner = event.get(head)
    if not isinstance(inner, dict):
        inner = {}
        event[head] = inner
    inner[attr] = value


def _bentoml_groups(raw: Mapping[str, Any], event: dict[str, Any], used: set[str]) -> None:
    groups = event.get("groups")
    groups = dict(groups) if isinstance(groups, dict) else {}
    for key, value in raw.items():
        if key in used or key in BENTOML_RESERVED or key in groups:
            continue
        if isinstance(value, str | bool) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            groups[key] = value
    if groups:
        event["groups"] = groups

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

``kind: bentoml`` reads BentoML's monitoring data logs (default sink,
``monitoring/<monitor name>/data/*.log``; tail that glob). One line per ``mon.log`` row::

    {"timestamp": "2026-11-23T10:00:00.123456", "request_id": 1234567890,
     "pred": 1, "probs": [0.2, 0.8], "input_uri": "file:///srv/images/1.png", "site": "B"}

i.e. the ``name=`` of each ``mon.log(...)`` call as a key, plus BentoML's ``timestamp`` (naive
ISO, read as UTC) and ``request_id``. Defaults: ``id`` ← ``request_id``, ``ts`` ←
``timestamp``, ``pred`` ← ``pred|prediction|label``, ``probs`` ← ``probs|probabilities``,
``input.uri`` ← ``input_uri|image_uri``, ``model_version`` ← ``model_version``; every other
scalar column is offered as a group attribute (serve keeps only ``groups.attributes``).
``mapping`` entries override these defaults. When one request logs several rows (a batch),
log a per-row id column and map ``id`` to it: BentoML's ``request_id`` repeats within a request.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

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
_MISSING = object()

Source = tuple[tuple[str, ...], ...] | str  # alternatives of split paths, or a literal


def map_record(kind: str, mapping: Mapping[str, str], raw: dict[str, Any]) -> dict[str, Any]:
    """Map one raw JSON record to a schema-v1 event dict (see the module docstring)."""
    if not isinstance(raw, dict):
        raise ValidationError("wrong_type", f"a {kind} log line must be a JSON object")
    compiled = compile_mapping(kind, tuple(sorted(mapping.items())))
    event: dict[str, Any] = {}
    used: set[str] = set()
    for target, source in compiled:
        value = _resolve(raw, source, used)
        if value is not _MISSING:
            _assign(event, target, value)
    if kind == "bentoml":
        _bentoml_groups(raw, event, used)
    return event


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
        if key in used or key in ("timestamp", "request_id") or key in groups:
            continue
        if isinstance(value, str | bool) or (
            isinstance(value, int) and not isinstance(value, bool)
        ):
            groups[key] = value
    if groups:
        event["groups"] = groups

"""Field-level validation of prediction events: ids, timestamps, numbers, input paths.

Shared by :mod:`patchd.ingest.records` (the parser). Every function raises
:class:`~patchd.exceptions.ValidationError` naming the field and a reason code.
"""

from __future__ import annotations

import os
from array import array
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from patchd.exceptions import PathNotAllowedError, ValidationError

MAX_ID_CHARS = 256
MAX_EMBEDDING_DIMS = 8192
FLOAT32_MAX = 3.4e38
MAX_TS = 32503680000.0  # year 3000


def resolve_input_path(uri: str) -> Path:
    """``file://`` URI or absolute path → resolved path (symlinks followed). Other schemes fail."""
    return Path(os.path.realpath(input_path_text(uri)))


def input_path_text(uri: str) -> str:
    """``file://`` URI or absolute path → the absolute path it names (not resolved yet)."""
    if "\x00" in uri:
        raise ValidationError("invalid_value", "contains a NUL byte", field="input")
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValidationError("invalid_value", f"remote file URI {uri[:200]!r}", field="input")
        text = unquote(parts.path)
    elif "://" in uri:
        raise ValidationError(
            "invalid_value",
            f"only file:// URIs and local paths are accepted, got {uri[:200]!r}",
            field="input",
        )
    else:
        text = uri
    if not text.startswith("/") or "\x00" in text:
        raise ValidationError(
            "invalid_value", f"{text[:200]!r} is not an absolute path", field="input"
        )
    return text


def check_inside(path: Path, roots: tuple[Path, ...], shown: str) -> None:
    """Raise :class:`PathNotAllowedError` unless the resolved ``path`` lies inside a root."""
    if not any(path.is_relative_to(root) for root in roots):
        raise PathNotAllowedError(shown[:200], [str(r) for r in roots])


def kind_of(value: object) -> str:
    return "null" if value is None else type(value).__name__


def parse_ident(value: object) -> str:
    if isinstance(value, str):
        if 0 < len(value) <= MAX_ID_CHARS:
            return value
        if not value:
            raise ValidationError("invalid_value", "must not be empty", field="id")
        raise ValidationError("too_large", f"longer than {MAX_ID_CHARS} characters", field="id")
    if type(value) is int:
        return str(value)
    if value is None:
        raise ValidationError("missing_field", "is required", field="id")
    raise ValidationError("wrong_type", f"must be a string, got {kind_of(value)}", field="id")


def parse_timestamp(value: object, now: float) -> float:
    if value is None:
        return now
    if type(value) is float or type(value) is int:
        ts = float(value) if -1e18 < value < 1e18 else -1.0
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValidationError(
                "invalid_value", f"{value[:64]!r} is not ISO 8601", field="ts"
            ) from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        ts = parsed.timestamp()
    else:
        raise ValidationError(
            "wrong_type", f"must be ISO 8601 or a number, got {kind_of(value)}", field="ts"
        )
    if not (0.0 < ts < MAX_TS):  # 1970 .. 3000
        raise ValidationError("invalid_value", f"{value!r} is out of range", field="ts")
    return ts


def parse_optional_str(value: object, field: str, limit: int) -> str | None:
    if value is None or (isinstance(value, str) and len(value) <= limit):
        return value
    if isinstance(value, str):
        raise ValidationError("too_large", f"longer than {limit} characters", field=field)
    raise ValidationError("wrong_type", f"must be a string, got {kind_of(value)}", field=field)


def parse_floats(value: object, field: str, limit: int) -> list[float]:
    if not isinstance(value, list):
        raise ValidationError(
            "wrong_type", f"must be a list of numbers, got {kind_of(value)}", field=field
        )
    if len(value) > limit:
        raise ValidationError("too_large", f"more than {limit} values", field=field)
    out: list[float] = []
    for v in value:
        if type(v) is not float and type(v) is not int:
            raise ValidationError(
                "wrong_type", f"must contain numbers, got {kind_of(v)}", field=field
            )
        if not -FLOAT32_MAX <= v <= FLOAT32_MAX:  # also false for NaN
            raise ValidationError(
                "invalid_value", "contains a non-finite or out-of-float32-range value", field=field
            )
        out.append(float(v))
    return out


def parse_embedding(value: object) -> bytes | None:
    if value is None:
        return None
    floats = parse_floats(value, "embedding", MAX_EMBEDDING_DIMS)
    return array("f", floats).tobytes()

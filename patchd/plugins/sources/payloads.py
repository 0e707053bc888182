"""Model-server payload bodies: KServe v1, Open Inference Protocol (v2) JSON and its binary
tensor extension, and the step from an output tensor to ``(pred, probs)`` per instance.

Everything here is pure (bytes in, frozen dataclasses out) and raises
:class:`~patchd.exceptions.ValidationError` with a short ``reason`` code on bad input:

``bad_json``, ``unsupported_body``, ``binary_header``, ``binary_truncated``,
``unsupported_datatype``, ``shape_mismatch``, ``no_prediction``, ``unknown_class``.

Reading a classifier's output (``prediction_from_value``):
- an integer → the predicted class; a string → its index in ``class_names``;
- a list of floats → probabilities when they are in [0, 1] and sum to 1 (±1e-3), otherwise
  logits (softmaxed); a single value p in [0, 1] → binary ``[1 - p, p]``;
- a mapping with ``pred``/``label``/``class``/``prediction`` and/or
  ``probs``/``probabilities``/``scores``/``logits`` keys.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from patchd.exceptions import ValidationError

# datatype -> (struct code, bytes per element); BYTES is length-prefixed and handled apart.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("?", 1),
    "UINT8": ("B", 1),
    "UINT16": ("H", 2),
    "UINT32": ("I", 4),
    "UINT64": ("Q", 8),
    "INT8": ("b", 1),
    "INT16": ("h", 2),
    "INT32": ("i", 4),
    "INT64": ("q", 8),
    "FP16": ("e", 2),
    "FP32": ("f", 4),
    "FP64": ("d", 8),
}
FLOAT_TYPES = frozenset({"FP16", "FP32", "FP64"})
INT_TYPES = frozenset(k for k in DTYPES if k.startswith(("INT", "UINT")))
PRED_KEYS = ("pred", "label", "class", "prediction", "predicted_class", "class_id")
PROBS_KEYS = ("probs", "probabilities", "scores", "proba", "logits")
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG: inputs serve stores


@dataclass(frozen=True)
class Tensor:
    """One OIP tensor with its data flattened row-major (BYTES elements as ``bytes``)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: tuple[Any, ...]

    @property
    def batch(self) -> int:
        return self.shape[0] if self.shape else 1

    def rows(self) -> list[tuple[Any, ...]]:
        """The tensor split along its first axis (one row per instance)."""
        n = self.batch
        width = len(self.data) // n if n else 0
        return [self.data[i * width : (i + 1) * width] for i in range(n)]


@dataclass(frozen=True)
class Prediction:
    pred: int
    probs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class InputRef:
    """How patchd can find an instance's input: a URI or the raw bytes (stored by serve), or
    ``dropped``: why the instance's input cannot be used (counted; the prediction is kept)."""

    uri: str | None = None
    data: bytes | None = None
    dropped: str | None = None


# Why an instance's input was dropped (label ``reason`` of patchd_capture_inputs_dropped_total,
# beside the URI checks' path_not_allowed / not_found ... and not_image / too_large).
NO_IMAGE = "no_image"  # a numeric tensor or feature row: nothing patchd can patch
NOT_BASE64 = "not_base64"  # a b64 field that does not decode
INLINE_OFF = "inline_disabled"  # image bytes, but sources.<kserve|seldon>.inline_inputs is off


def load_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # too deep, a huge integer
        raise ValidationError("bad_json", f"{what} body is not JSON: {str(err)[:200]}") from None


# --------------------------------------------------------------------------- OIP (v2) bodies


def split_binary(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bytes]:
    """Split a (possibly binary-extension) OIP body into its JSON header and the raw tail.

    ``header_length`` comes from ``Inference-Header-Content-Length`` when the sender kept it;
    loggers usually drop that header, so without it the JSON object's own end is found with
    ``raw_decode`` and whatever follows is the binary tail.
    """
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ValidationError(
                "binary_header",
                f"Inference-Header-Content-Length {header_length} does not fit a "
                f"{len(body)}-byte body",
            )
        return _json_object(load_json(body[:header_length], "OIP header")), body[header_length:]
    start = len(body) - len(body.lstrip(JSON_WHITESPACE))  # bodies sent verbatim: "\n{...}"
    try:
        text = body.decode("latin-1")  # 1:1 byte<->char, so offsets are byte offsets
        obj, end = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError) as err:
        raise ValidationError("bad_json", f"OIP body is not JSON: {str(err)[:200]}") from None
    if not body[:end].isascii():
        obj = load_json(body[:end], "OIP header")  # re-decode non-ASCII text as UTF-8
    return _json_object(obj), body[end:]


JSON_WHITESPACE = b" \t\n\r"  # RFC 8259 insignificant whitespace (not \v, \f)


def is_blank(tail: bytes) -> bool:
    """The bytes after a JSON body are only JSON whitespace (a trailing newline, no tensors)."""
    return not tail.strip(JSON_WHITESPACE)


def _json_object(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValidationError(
            "unsupported_body", f"expected a JSON object, got {type(obj).__name__}"
        )
    return obj


def parse_oip_tensors(header: Mapping[str, Any], key: str, tail: bytes = b"") -> tuple[Tensor, ...]:
    """The ``inputs`` or ``outputs`` of an OIP body, binary-extension data read from ``tail``."""
    specs = header.get(key)
    if not isinstance(specs, list) or not specs:
        raise ValidationError("unsupported_body", f"OIP body has no {key!r} list")
    offset, out = 0, []
    for spec in specs:
        tensor, used = _tensor(spec, key, tail, offset)
        out.append(tensor)
        offset += used
    # JSON-only bodies may end in whitespace; a binary tail is exact (its bytes may be 0x20)
    if offset != len(tail) and not (offset == 0 and is_blank(tail)):
        raise ValidationError(
            "binary_truncated", f"binary tail has {len(tail)} bytes, tensors declare {offset}"
        )
    return tuple(out)


def _tensor(spec: Any, key: str, tail: bytes, offset: int) -> tuple[Tensor, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ValidationError("unsupported_body", f"each of {key!r} needs a name")
    name, datatype = spec["name"], str(spec.get("datatype", ""))
    raw_shape, raw_data = spec.get("shape"), spec.get("data")
    if key == "inputs" and raw_shape == -1 and isinstance(raw_data, str):
        raw_shape, raw_data = [1], [raw_data]  # KServe's TorchServe v2 bytes sample: one string
    shape = _shape(raw_shape, name)
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(tail):
            raise ValidationError(
                "binary_truncated",
                f"tensor {name!r} declares binary_data_size={size!r} but only "
                f"{len(tail) - offset} bytes remain",
            )
        data = decode_binary(datatype, tail[offset : offset + size], name)
        used = size
    else:
        data, used = _flatten(raw_data, datatype), 0
    expected = math.prod(shape)
    if len(data) != expected or (shape and shape[0] > max(1, len(data))):  # [10**9, 0]: no rows
        raise ValidationError(
            "shape_mismatch",
            f"tensor {name!r} has {len(data)} elements, shape {list(shape)} needs {expected}",
        )
    return Tensor(name, datatype, shape, tuple(data)), used


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and d >= 0 for d in raw):
        raise ValidationError("unsupported_body", f"tensor {name!r} has a bad shape {raw!r}")
    return tuple(raw)


def _flatten(data: Any, datatype: str) -> list[Any]:
    if data is None:
        raise ValidationError("unsupported_body", "tensor has neither data nor binary_data_size")
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item.encode() if datatype == "BYTES" and isinstance(item, str) else item)
    return out


def decode_binary(datatype: str, raw: bytes, name: str = "?") -> list[Any]:
    """Raw little-endian tensor bytes → flat list (BYTES: 4-byte length-prefixed elements)."""
    if datatype == "BYTES":
        return _decode_bytes(raw, name)
    if datatype not in DTYPES:
        raise ValidationError(
            "unsupported_datatype",
            f"tensor {name!r} has datatype {datatype!r}; supported: BYTES, {', '.join(DTYPES)}",
        )
    code, width = DTYPES[datatype]
    if len(raw) % width:
        raise ValidationError(
            "binary_truncated", f"tensor {name!r}: {len(raw)} bytes is not a multiple of {width}"
        )
    return list(struct.unpack(f"<{len(raw) // width}{code}", raw))


def _decode_bytes(raw: bytes, name: str) -> list[Any]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ValidationError("binary_truncated", f"BYTES tensor {name!r} cut inside a length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ValidationError("binary_truncated", f"BYTES tensor {name!r} element cut short")
        out.append(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def predictions_from_outputs(
    outputs: Sequence[Tensor], class_names: Sequence[str], wanted: str | None = None
) -> list[Prediction]:
    """One :class:`Prediction` per instance from OIP output tensors.

    ``wanted`` names the tensor to read. Otherwise an integer or BYTES tensor gives ``pred``
    and the first float tensor gives ``probs`` (argmax gives ``pred`` when no label tensor).
    """
    if wanted is not None:
        chosen = [t for t in outputs if t.name == wanted]
        if not chosen:
            names = [t.name for t in outputs]
            raise ValidationError("no_prediction", f"no output {wanted!r} (have {names})")
        outputs = chosen
    floats = next((t for t in outputs if t.datatype in FLOAT_TYPES), None)
    labels = next((t for t in outputs if t.datatype in INT_TYPES | {"BYTES"}), None)
    if floats is None and labels is None:
        raise ValidationError("no_prediction", "no float, integer or BYTES output tensor")
    probs = [_probs(row) for row in floats.rows()] if floats is not None else None
    preds = [_label(row, class_names) for row in labels.rows()] if labels is not None else None
    if probs is not None and preds is not None and len(probs) != len(preds):
        raise ValidationError("shape_mismatch", "label and score outputs differ in batch size")
    if preds is None:
        return [Prediction(_argmax(p), p) for p in probs or []]
    return [Prediction(p, probs[i] if probs else None) for i, p in enumerate(preds)]


def _label(row: Sequence[Any], class_names: Sequence[str]) -> int:
    if len(row) != 1:
        raise ValidationError("no_prediction", f"a label output must hold 1 value per row: {row}")
    return _class_index(row[0], class_names)


def _class_index(value: Any, class_names: Sequence[str]) -> int:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        if value in class_names:
            return list(class_names).index(value)
        if value.lstrip("-").isdigit():
            return int(value)
        raise ValidationError(
            "unknown_class", f"class {value!r} is not in model.class_names {list(class_names)}"
        )
    raise ValidationError("no_prediction", f"cannot read a class from {value!r}")


def _probs(row: Sequence[Any]) -> tuple[float, ...]:
    values = [float(v) for v in row]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValidationError("no_prediction", f"scores must be finite numbers: {list(row)[:8]}")
    if len(values) == 1 and 0.0 <= values[0] <= 1.0:
        return (1.0 - values[0], values[0])
    if all(0.0 <= v <= 1.0 for v in values) and abs(sum(values) - 1.0) <= 1e-3:
        return tuple(values)
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return tuple(e / total for e in exps)


def _argmax(probs: Sequence[float]) -> int:
    return max(range(len(probs)), key=probs.__getitem__)


def prediction_from_value(value: Any, class_names: Sequence[str]) -> Prediction:
    """One v1 / JSON prediction (see the module docstring for the accepted shapes)."""
    if isinstance(value, Mapping):
        return _from_mapping(value, class_names)
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], list):
            value = value[0]
        if value and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            probs = _probs(value)
            return Prediction(_argmax(probs), probs)
        raise ValidationError("no_prediction", f"cannot read a prediction from {value!r:.80}")
    if isinstance(value, float) and not value.is_integer() and 0.0 <= value <= 1.0:
        probs = _probs([value])
        return Prediction(_argmax(probs), probs)
    return Prediction(_class_index(value, class_names))


def _from_mapping(value: Mapping[str, Any], class_names: Sequence[str]) -> Prediction:
    raw_pred = next((value[k] for k in PRED_KEYS if k in value), None)
    raw_probs = next((value[k] for k in PROBS_KEYS if k in value), None)
    probs = None
    if raw_probs is not None:
        if not isinstance(raw_probs, list):
            raise ValidationError("no_prediction", f"scores must be a list, got {raw_probs!r:.60}")
        probs = _probs(raw_probs)
    if raw_pred is not None:
        return Prediction(_class_index(raw_pred, class_names), probs)
    if probs is not None:
        return Prediction(_argmax(probs), probs)
    raise ValidationError(
        "no_prediction", f"prediction object has none of {PRED_KEYS + PROBS_KEYS}: {list(value)}"
    )


# --------------------------------------------------------------------------- KServe v1 bodies


def v1_predictions(body: Mapping[str, Any], class_names: Sequence[str]) -> list[Prediction]:
    """``{"predictions": [...]}`` (KServe v1 / TF-serving row format) → one per instance."""
    preds = body.get("predictions")
    if not isinstance(preds, list):
        raise ValidationError("unsupported_body", "v1 response has no 'predictions' list")
    return [prediction_from_value(p, class_names) for p in preds]


def v1_inputs(body: Mapping[str, Any], inline: bool) -> list[InputRef | None]:
    """Per instance of ``{"instances": [...]}``: a URI or inline image bytes when recognisable.

    Recognised: ``{"b64": "..."}`` (TF-serving binary convention), ``{<any key>: {"b64": ...}}``
    (``image_bytes``, ``image``), ``{"data": "<base64>"}`` (KServe's TorchServe samples),
    ``{"uri"|"url"|"image_uri": "..."}`` and a bare string that looks like a URI. Anything else
    (a feature row, a number) is an :class:`InputRef` with ``dropped`` set: counted, not an error.
    """
    instances = body.get("instances", body.get("inputs"))
    if not isinstance(instances, list):
        raise ValidationError("unsupported_body", "v1 request has no 'instances' list")
    return [_instance_input(item, inline) for item in instances]


def _instance_input(item: Any, inline: bool) -> InputRef:
    if isinstance(item, str) and "://" in item:
        return InputRef(uri=item)
    if not isinstance(item, dict):
        return InputRef(dropped=NO_IMAGE)
    for key in ("uri", "url", "image_uri", "input_uri"):
        if isinstance(item.get(key), str):
            return InputRef(uri=item[key])
    b64 = _b64_field(item)
    if b64 is None:
        return InputRef(dropped=NO_IMAGE)
    if not inline:
        return InputRef(dropped=INLINE_OFF)
    return inline_ref(b64)


def _b64_field(item: Mapping[str, Any]) -> str | None:
    """The base64 text of ``{"b64": ...}``, ``{<key>: {"b64": ...}}`` or ``{"data": "..."}``."""
    if isinstance(item.get("b64"), str):
        return str(item["b64"])
    for value in item.values():
        if isinstance(value, dict) and isinstance(value.get("b64"), str):
            return str(value["b64"])
    data = item.get("data")
    return data if isinstance(data, str) else None


def inline_ref(b64: str) -> InputRef:
    """Base64 text → the decoded bytes, or a dropped input when it does not decode."""
    try:
        return InputRef(data=base64.b64decode(b64, validate=True))
    except ValueError:
        return InputRef(dropped=NOT_BASE64)


def oip_inputs(tensors: Sequence[Tensor], inline: bool) -> list[InputRef | None]:
    """Per instance: the BYTES input (an encoded image, raw or as base64 text as KServe's
    TorchServe samples send it) inline, a string that is a URI by reference; else dropped."""
    source = next((t for t in tensors if t.datatype == "BYTES"), None)
    if source is None:
        return [InputRef(dropped=NO_IMAGE)] * (tensors[0].batch if tensors else 0)
    out: list[InputRef | None] = []
    for row in source.rows():
        value = row[0] if len(row) == 1 else None
        if not isinstance(value, bytes):
            out.append(InputRef(dropped=NO_IMAGE))
        elif value[:64].isascii() and b"://" in value[:64]:
            out.append(InputRef(uri=value.decode("ascii", "replace")))
        elif not inline:
            out.append(InputRef(dropped=INLINE_OFF))
        elif value.isascii() and not value.startswith(IMAGE_MAGIC):
            decoded = inline_ref(value.decode("ascii"))
            out.append(decoded if decoded.data is not None else InputRef(data=value))
        else:
            out.append(InputRef(data=value))
    return out


def is_oip(body: Mapping[str, Any]) -> bool:
    return isinstance(body.get("outputs"), list) or (
        isinstance(body.get("inputs"), list)
        and bool(body["inputs"])
        and isinstance(body["inputs"][0], dict)
        and "datatype" in body["inputs"][0]
    )

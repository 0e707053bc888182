"""BentoML monitor files and TorchServe handler traffic, N of each, with exact expected outcomes.

Both follow what upstream writes (docs/capture.md, "What BentoML writes" / "What TorchServe hands
the handler"): BentoML's ``DefaultMonitor`` lines (python-json-logger, numpy values as ``str()``,
naive local ``timestamp``, ``request_id`` as a string, daily rotation to
``data.<worker>.log.<YYYY-MM-DD>``), and TorchServe requests as ``ts/protocol`` decodes them
(header names as the client sent them, request ids from the frontend), through TorchServe's own
``Service.retrieve_data_for_inference`` and ``Context`` into :class:`PatchdHandlerMixin`.

For a replay test::

    files = bentoml_monitor(10_000, images_root="/srv/images")
    write_bentoml(tmp / "monitoring/skin/data", files)      # tail kind bentoml, timezone=files.zone
    batches = torchserve_batches(10_000, images_root="/srv/images")
    run = handler_events(batches.batches)     # run.events: POST /v1/predictions as the mixin does
    # then compare patchd's counters with files.expected / batches.expected

The model has :data:`CLASS_NAMES` and the group attribute ``site``; ``images_root`` must be in
``sources.allowed_roots`` and ``/etc`` must not be.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

CLASS_NAMES = ("benign", "malignant", "other")
SITES = ("A", "B", "C")
PROBS_TEXT = "[0.1 0.2 0.7]"  # str(np.array([0.1, 0.2, 0.7], dtype=np.float32))
SUMMARIZED = "[0.001 0.001 0.001 ... 0.001 0.001 0.001]"  # str() of an array over 1000 values
OUTSIDE = "/etc/patchd-outside"  # a directory outside every allowed root


@dataclass(frozen=True)
class Expected:
    """What patchd must report for one source after the replay."""

    stored: int
    rejected: Mapping[str, int]  # reason -> patchd_ingest_rejected_total{source,reason}
    inputs_dropped: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    inputs_kept: int = 0
    not_logged: int = 0  # TorchServe requests the mixin does not log (describe, non-2xx)
    ts: Mapping[str, float] = field(default_factory=dict)  # event id -> unix time (BentoML)


@dataclass(frozen=True)
class BentoFiles:
    files: tuple[tuple[str, bytes], ...]  # (file name in data/, content), oldest first
    zone: str  # the writer's zone: the tail source's ``timezone``
    expected: Expected


def _bento_line(row: dict[str, Any], ts: str, request_id: str) -> bytes:
    record = {**row, "timestamp": ts, "request_id": request_id, "trace_id": "0"}
    return json.dumps(record).encode() + b"\n"  # python-json-logger's json.dumps defaults


def _vectors(n: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Four probability vectors over ``n`` classes (top classes 2, 0, 1, 2), exact in float32;
    the three-class ones are the literals the fixtures were written with."""
    if n == 3:
        return [0.1, 0.2, 0.7], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.2, 0.3, 0.5]

    def top(c: int) -> list[float]:
        return [0.5 if k == c else 0.5 / (n - 1) for k in range(n)]

    return top(2), top(0), top(1), top(2)


def _np_text(values: list[float]) -> str:
    """``str()`` of a float32 numpy array, what python-json-logger writes for one."""
    if values == [0.1, 0.2, 0.7]:
        return PROBS_TEXT
    import numpy as np

    return str(np.array(values, dtype=np.float32))


def _bento_row(
    i: int, images_root: str, n_classes: int = len(CLASS_NAMES)
) -> tuple[dict[str, Any], str | None, str | None]:
    """Row ``i``: the logged columns, the rejection reason, the input-drop reason (or "kept")."""
    site = SITES[i % 3]
    kind = i % 10
    va, vb, vc, vd = _vectors(n_classes)
    if kind == 0:  # np.int64 pred, float32 array probs, a usable input
        uri = f"file://{images_root}/bento-{i}.png"
        return {"pred": "2", "probs": _np_text(va), "site": site, "input_uri": uri}, None, "kept"
    if kind == 1:  # list(np.float32 array), an object-store URI: the input is dropped
        row = {"pred": 0, "probs": [str(v) for v in vb], "site": site,
               "input_uri": f"s3://bucket/{i}.png"}  # fmt: skip
        return row, None, "invalid_value"
    if kind == 2:  # a path outside the roots: dropped
        row = {"pred": "1", "probs": vc, "site": site,
               "input_uri": f"{OUTSIDE}/{i}.png"}  # fmt: skip
        return row, None, "path_not_allowed"
    if kind == 3:  # a class index the model does not have ("7" of three classes)
        row = {"pred": str(n_classes + 4), "probs": _np_text(va), "site": site}
        return row, "invalid_value", None
    if kind == 6:
        return {"pred": "1", "probs": SUMMARIZED, "site": site}, "invalid_value", None
    return {"pred": str(kind % 3), "probs": vd, "site": site}, None, None


def bentoml_monitor(
    n: int,
    *,
    images_root: str,
    zone: str = "Asia/Tokyo",
    start: datetime = datetime(2026, 11, 23, 10, 0, 0),
    rows_per_file: int = 1000,
    worker: int = 0,
    class_names: Sequence[str] = CLASS_NAMES,
) -> BentoFiles:
    """``n`` monitor rows (one ``mon.log`` record each), rotated every ``rows_per_file`` rows.

    Per ten rows: 6 stored (3 with an input: 1 kept, 1 dropped ``invalid_value``, 1 dropped
    ``path_not_allowed``), and rejected: a class index out of range (``"7"`` of the default
    three ``class_names``) and a summarized array
    (``invalid_value``), ``request_id`` ``"None"`` (``missing_field``), a second row of a batch
    under the same ``request_id`` (``duplicate``).
    """
    tz = ZoneInfo(zone)
    lines: list[bytes] = []
    rejected: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    kept, stored, stamps, ids = 0, 0, {}, []
    for i in range(n):
        wall = start + timedelta(milliseconds=i)
        row, reason, drop = _bento_row(i, images_root, len(class_names))
        rid = str(1_000_000 + i)
        if i % 10 == 4:
            rid, reason = "None", "missing_field"  # mon.log outside a request
        elif i % 10 == 5:  # log_batch: this row repeats the request id (and time) of row i-5
            rid, reason, wall = ids[i - 5], "duplicate", start + timedelta(milliseconds=i - 5)
        ids.append(rid)
        lines.append(_bento_line(row, wall.isoformat(), rid))
        if reason is not None:
            rejected[reason] += 1
            continue
        stored += 1
        stamps[rid] = wall.replace(tzinfo=tz).timestamp()
        if drop == "kept":
            kept += 1
        elif drop is not None:
            dropped[drop] += 1
    files = _rotate(lines, rows_per_file, start, worker)
    expected = Expected(stored, dict(rejected), dict(dropped), kept, ts=stamps)
    return BentoFiles(files, zone, expected)


def _rotate(
    lines: list[bytes], per_file: int, start: datetime, worker: int
) -> tuple[tuple[str, bytes], ...]:
    """TimedRotatingFileHandler(when="D") names: the live file, and one per rolled-over day."""
    chunks = [lines[k : k + per_file] for k in range(0, len(lines), per_file)] or [[]]
    base = f"data.{worker}.log"
    out = []
    for k, chunk in enumerate(chunks):
        day = (start + timedelta(days=k)).date().isoformat()
        name = base if k == len(chunks) - 1 else f"{base}.{day}"
        out.append((name, b"".join(chunk)))
    return tuple(out)


def write_bentoml(directory: Path, files: BentoFiles) -> list[Path]:
    """Write the files (the rotated ones first, as they were written)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, content in files.files:
        path = directory / name
        path.write_bytes(content)
        paths.append(path)
    return paths


def rotate_bentoml(
    directory: Path, files: BentoFiles, *, lines_per_write: int = 100, pause_s: float = 0.0
) -> None:
    """Write the files as BentoML's ``TimedRotatingFileHandler`` does, live: lines are appended
    to ``data.<worker>.log``; at each rollover that file is renamed to its dated name and a new
    one is started. A tail source reading meanwhile sees every rename."""
    directory.mkdir(parents=True, exist_ok=True)
    live = directory / files.files[-1][0]
    for name, content in files.files:
        lines = content.splitlines(keepends=True)
        with live.open("ab") as f:
            for k in range(0, len(lines), lines_per_write):
                f.write(b"".join(lines[k : k + lines_per_write]))
                f.flush()
                if pause_s:
                    time.sleep(pause_s)
        if name != live.name:
            live.rename(directory / name)


# ----------------------------------------------------------------------------- TorchServe


@dataclass(frozen=True)
class TorchServeBatch:
    """One batch as TorchServe's frontend sends it to the worker (``ts/protocol`` decoded)."""

    frames: tuple[dict[str, Any], ...]
    outputs: tuple[Any, ...]  # the handler's output per request
    status: tuple[int, ...]  # what the handler set with context.set_response_status


@dataclass(frozen=True)
class TorchServeTraffic:
    batches: tuple[TorchServeBatch, ...]
    expected: Expected


def _frame(request_id: str, headers: Mapping[str, str]) -> dict[str, Any]:
    return {
        "requestId": request_id.encode(),
        "headers": [{"name": k.encode(), "value": v.encode()} for k, v in headers.items()],
        "parameters": [{"name": "body", "contentType": "image/png", "value": b"\x89PNG..."}],
    }


def _ts_request(
    j: int, images_root: str, class_names: Sequence[str] = CLASS_NAMES
) -> tuple[dict[str, str], Any, int, str]:
    """Request ``j``: headers, handler output, status, and outcome (stored/reject reason/skip)."""
    site = SITES[j % 3]
    kind = j % 8
    scores = _vectors(len(class_names))[0]  # [0.1, 0.2, 0.7] for three classes
    if kind == 0:  # ImageClassifier without index_to_name.json: names "0".."N-1"
        headers = {"X-Patchd-Group-Site": site, "X-Patchd-Input-Uri": f"{images_root}/ts-{j}.png"}
        return headers, {"2": 0.7, "0": 0.2, "1": 0.1}, 200, "stored_input"
    if kind == 1:  # with index_to_name.json; a lower-case header
        names = {class_names[0]: 0.8, class_names[2]: 0.2}
        return {"x-patchd-group-site": site}, names, 200, "stored"
    if kind == 2:  # a class index the model does not have ("5" of three classes)
        missing = {str(len(class_names) + 2): 0.9, "0": 0.1}
        return {"X-PATCHD-GROUP-SITE": site}, missing, 200, "invalid_value"
    if kind == 3:
        return {"X-Patchd-Group-Site": site}, {"zebra": 0.9}, 200, "invalid_value"
    if kind == 4:  # the handler failed this request (non-2xx): nothing to log
        return {"X-Patchd-Group-Site": site}, {"error": "bad image"}, 500, "skip"
    if kind == 5:  # the model's describe API (a batch of its own)
        return {"describe": "True"}, {"model": "skin"}, 200, "skip"
    if kind == 6:  # an object-store URI: the mixin keeps the prediction, drops the input
        headers = {"X-Patchd-Group-Site": site, "X-Patchd-Input-Uri": f"s3://bucket/ts-{j}.png"}
        return headers, scores, 200, "stored_dropped"
    return {"X-Patchd-Group-Site": site}, scores, 200, "stored"


def torchserve_batches(
    n: int, *, images_root: str, batch_size: int = 4, class_names: Sequence[str] = CLASS_NAMES
) -> TorchServeTraffic:
    """``n`` TorchServe requests in batches of up to ``batch_size`` (describe alone).

    Per eight requests: 4 stored (1 with its input, 1 whose ``s3://`` input the mixin drops as
    ``not_local``), 2 rejected ``invalid_value`` (index 5, name "zebra"), 2 not logged (a 500
    and a describe request).
    """
    batches: list[TorchServeBatch] = []
    pending: list[tuple[dict[str, Any], Any, int]] = []
    rejected: Counter[str] = Counter()
    stored = kept = skipped = dropped = 0

    def flush() -> None:
        if pending:
            frames, outputs, status = zip(*pending, strict=True)
            batches.append(TorchServeBatch(frames, outputs, status))
            pending.clear()

    for j in range(n):
        headers, output, status, outcome = _ts_request(j, images_root, class_names)
        item = (_frame(f"ts-{j:08d}", headers), output, status)
        if outcome == "skip":
            skipped += 1
        elif outcome.startswith("stored"):
            stored += 1
            kept += outcome == "stored_input"
            dropped += outcome == "stored_dropped"
        else:
            rejected[outcome] += 1
        if "describe" in headers:
            flush()
            pending.append(item)
            flush()
            continue
        pending.append(item)
        if len(pending) == batch_size:
            flush()
    flush()
    lost = {"not_local": dropped} if dropped else {}
    expected = Expected(stored, dict(rejected), lost, kept, not_logged=skipped)
    return TorchServeTraffic(tuple(batches), expected)


class _Capture:
    """Records what the mixin logs and hands it on to ``forward`` (a real ``PatchdLogger``)."""

    def __init__(self, forward: Any = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.forward = forward

    def log(self, event: dict[str, Any]) -> bool:
        self.events.append(event)
        return self.forward.log(event) if self.forward is not None else True


@dataclass(frozen=True)
class HandlerRun:
    events: list[dict[str, Any]]  # what the mixin logged, in order (it POSTs these)
    inputs_dropped: Mapping[str, int]  # the mixin's patchd_inputs_dropped


def handler_events(
    batches: tuple[TorchServeBatch, ...], model: str = "skin", *, logger: Any = None
) -> HandlerRun:
    """Drive :class:`PatchdHandlerMixin` with TorchServe's own request parsing and Context.

    Needs ``torchserve`` (the dev extra): ``ts.service.Service.retrieve_data_for_inference``
    builds the per-request headers exactly as the worker does, ``ts.context.Context`` carries them.
    Returns the events the mixin logged, in order (what it POSTs to ``/v1/predictions``), and
    the inputs it did not send. With ``logger`` (a ``PatchdLogger``) the events are also sent,
    as a handler in TorchServe sends them.
    """
    from ts.context import Context
    from ts.service import Service

    from patchd.plugins.serving.torchserve import PatchdHandlerMixin

    class Preset:
        outputs: tuple[Any, ...] = ()

        def initialize(self, context: Any) -> None:
            return None

        def handle(self, data: list[Any], context: Any) -> list[Any]:
            return list(self.outputs)

    class Handler(PatchdHandlerMixin, Preset):
        patchd_group_headers = ("site",)

    capture = _Capture(logger)
    handler = Handler()
    handler.patchd_logger = capture  # type: ignore[assignment]
    handler.patchd_model = model
    for batch in batches:
        headers, data, ids = Service.retrieve_data_for_inference(list(batch.frames))
        context = Context(model, "/tmp", {}, len(batch.frames), None, "0.12.0")
        context.request_ids = ids
        context.request_processor = headers
        for i, code in enumerate(batch.status):
            context.set_response_status(code=code, phrase="", idx=i)
        handler.outputs = batch.outputs
        handler.handle(data, context)
    return HandlerRun(capture.events, dict(handler.patchd_inputs_dropped or {}))


def iter_lines(files: BentoFiles) -> Iterator[bytes]:
    for _, content in files.files:
        yield from content.splitlines(keepends=True)

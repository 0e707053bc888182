"""A run's Defuse failure regions on disk, and a person's labels for them (torch-free).

The ``vae`` augmenter writes ``<run>/synthesize/regions.json`` (each region's id, weight, source
class, the model's prediction mix, spread, novelty and its sample grid PNG). Labels live in
``<run>/regions/labels.json``: a class name or ``invalid`` per region, and who gave each one::

    {"schema": 2, "by": "<last writer>", "labels": {"3": "shirt"}, "given_by": {"3": "ana"}}

(schema-1 files have one ``by`` for every label). The ``defuse`` trainer reads the labels when the
train stage starts, so labels are refused once ``train/`` (or its temporary build directory)
exists, or once a person said labelling is done (:func:`close_labelling`, when a run paused in
``awaiting_labels`` is resumed: ``<run>/regions/done.json`` records who and when).
:func:`set_labels` is the one writer: ``patchd regions RUN --label`` and the approval
pages both call it; it checks region ids and class names, merges with the labels already given
under a file lock and replaces the file atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from patchd.exceptions import ConflictError, NotFoundError, ValidationError

INVALID = "invalid"
SCHEMA = 2
MAX_GRID_BYTES = 8 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_dir(artifacts_root: Path, run_id: str) -> Path:
    """``<artifacts>/runs/<run_id>`` of an existing run; a run id is a plain name, never a path."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise ValidationError("bad_run_id", f"run id {run_id!r} is not a plain run id")
    path = artifacts_root / "runs" / run_id
    if not path.is_dir():
        raise NotFoundError("run", run_id)
    return path


def regions_path(run: Path) -> Path:
    return run / "synthesize" / "regions.json"


def labels_path(run: Path) -> Path:
    """Where a person's region labels are stored."""
    return Path(run) / "regions" / "labels.json"


def has_regions(run: Path) -> bool:
    return regions_path(run).is_file()


def source_named(region: dict[str, Any]) -> dict[str, Any]:
    """A region dict with ``source_name`` (schema-1 files called it ``label_name``)."""
    if "source_name" not in region and "label_name" in region:
        return {**region, "source_name": region["label_name"]}
    return region


def load_regions(run: Path) -> list[dict[str, Any]]:
    """The regions of ``regions.json`` (NotFoundError when the run has none)."""
    path = regions_path(run)
    if not path.is_file():
        raise NotFoundError("regions of run (run it with patch.augmenter: vae)", run.name)
    try:
        body = json.loads(path.read_text())
    except ValueError as err:
        raise ValidationError("bad_regions", f"{path} is not valid JSON ({err})") from err
    found = body.get("regions", []) if isinstance(body, dict) else body  # schema 2 / schema 1
    return [source_named(r) for r in found if isinstance(r, dict)]


def grid_path(run: Path, region: int) -> Path:
    """The sample grid PNG of ``region``: the file ``regions.json`` names, accepted only when it
    is a ``.png`` inside the run's ``synthesize/`` folder (NotFoundError otherwise)."""
    found = next((r for r in load_regions(run) if int(r["region"]) == region), None)
    if found is None or not isinstance(found.get("preview"), str):
        raise NotFoundError(f"sample grid of a region of run {run.name}", str(region))
    stage = (run / "synthesize").resolve()
    path = (stage / found["preview"]).resolve()
    if path.suffix != ".png" or not path.is_relative_to(stage) or not path.is_file():
        raise NotFoundError(f"sample grid of a region of run {run.name}", str(region))
    return path


def read_grid(run: Path, region: int) -> bytes:
    """The PNG bytes of :func:`grid_path` (NotFoundError when not a PNG or over the size cap)."""
    path = grid_path(run, region)
    data = path.read_bytes() if path.stat().st_size <= MAX_GRID_BYTES else b""
    if not data.startswith(PNG_SIGNATURE):
        raise NotFoundError(f"PNG sample grid of a region of run {run.name}", str(region))
    return data


def region_ids(regions: Iterable[Mapping[str, Any]]) -> list[int]:
    return sorted(int(r["region"]) for r in regions)


def class_choices(regions: Iterable[Mapping[str, Any]], class_names: Iterable[str]) -> list[str]:
    """The class names a region may be labelled with (the model's and those the regions name)."""
    regions = list(regions)
    found = (
        {str(r["source_name"]) for r in regions if "source_name" in r}
        | {str(r["predicted"]) for r in regions if "predicted" in r}
        | set(class_names)
    )
    return sorted(found)


def prediction_mix(region: Mapping[str, Any]) -> list[tuple[str, int | None]]:
    """The model's predictions on a region's samples, most frequent first (schema-1 files only
    have the majority, with no count)."""
    mix = region.get("prediction_mix") or {str(region.get("predicted", "?")): None}
    return sorted(((str(k), v) for k, v in mix.items()), key=lambda kv: -(kv[1] or 0))


def spread_ratio(region: Mapping[str, Any]) -> float | None:
    """Within-region spread over the real spread of the source class (None when unknown)."""
    spread, real = region.get("spread"), region.get("real_spread")
    if not isinstance(spread, int | float) or not isinstance(real, int | float) or real <= 0:
        return None
    return float(spread) / float(real)


@dataclass(frozen=True)
class RegionLabels:
    """The labels file: ``{region: class name or 'invalid'}`` and who gave each label."""

    labels: Mapping[int, str]
    given_by: Mapping[int, str]

    def by(self, region: int) -> str | None:
        return self.given_by.get(region) if region in self.labels else None

    @property
    def people(self) -> str | None:
        """Everyone who gave a label, comma-joined (None when nothing is labelled)."""
        names = sorted({self.given_by[r] for r in self.labels if r in self.given_by})
        return ", ".join(names) if names else None


def read_labels(path: Path) -> RegionLabels:
    """The labels file at ``path`` (empty when there is none; ValidationError when unreadable)."""
    if not path.is_file():
        return RegionLabels({}, {})
    try:
        raw = json.loads(path.read_text())
        labels = {int(k): str(v) for k, v in raw.get("labels", {}).items()}
        default = raw.get("by")
        given = {int(k): str(v) for k, v in raw.get("given_by", {}).items()}
    except (ValueError, AttributeError, TypeError) as err:
        raise ValidationError(
            "bad_labels", f"region labels file {path} is not valid ({err}); fix or delete it"
        ) from err
    if isinstance(default, str):
        given = {r: given.get(r, default) for r in labels}
    return RegionLabels(labels, given)


def write_labels(
    path: Path, labels: Mapping[int, str], by: str = "person", keep: RegionLabels | None = None
) -> None:
    """Replace the labels file atomically; ``labels`` given now are recorded as ``by``'s, those
    of ``keep`` (not overridden) keep who gave them."""
    kept = keep or RegionLabels({}, {})
    merged = {**kept.labels, **labels}
    given = {r: kept.given_by.get(r, by) for r in kept.labels} | {r: by for r in labels}
    body = {
        "schema": SCHEMA,
        "by": by,
        "labels": {str(k): v for k, v in sorted(merged.items())},
        "given_by": {str(k): given[k] for k in sorted(merged)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".labels.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def check_label(
    region: int | str, name: str, regions: list[dict[str, Any]], classes: Iterable[str]
) -> tuple[int, str]:
    """(region id, label) after checking both: a known region, a known class or ``invalid``."""
    known = region_ids(regions)
    text = str(region).strip()
    if not text.isdigit() or int(text) not in known:
        raise NotFoundError(f"region (the run's regions are {known})", text)
    name = name.strip()
    choices = sorted(classes)
    if name != INVALID and name not in choices:
        raise ValidationError(
            "bad_label", f"class {name!r} is unknown; use one of {choices} or 'invalid'"
        )
    return int(text), name


def done_path(run: Path) -> Path:
    return Path(run) / "regions" / "done.json"


def close_labelling(run: Path, by: str) -> None:
    """Record that ``by`` is done labelling ``run`` (under the labels lock); no label is taken
    after it."""
    path = done_path(run)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".labels.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = path.with_name(".done.json.tmp")
        tmp.write_text(json.dumps({"by": by, "at": time.time()}))
        os.replace(tmp, path)


def labelling_closed(run: Path) -> str | None:
    """Why labels would no longer be used: the train stage has read them, or a person said
    labelling is done (None while open)."""
    if done_path(run).is_file():
        return (
            f"run {run.name} is past labelling: labelling was marked done and the run resumed "
            "to train; labels given now would change nothing"
        )
    if (run / "train").exists() or any(run.glob(".tmp-train-*")):
        return (
            f"run {run.name} is past labelling: its train stage has started or finished "
            "(train/ exists), and the defuse trainer reads the labels when it starts; "
            "labels given now would change nothing"
        )
    return None


def set_labels(
    run: Path, new: Mapping[str, str], by: str, class_names: Iterable[str]
) -> RegionLabels:
    """Check and store ``new`` labels of ``run``'s regions as given by ``by``; the labels now.

    NotFoundError: the run has no regions, or an unknown region id; ValidationError: an unknown
    class; ConflictError: the train stage has already read the labels.
    """
    regions = load_regions(run)
    classes = class_choices(regions, class_names)
    checked = dict(check_label(r, name, regions, classes) for r, name in new.items())
    path = labels_path(run)
    if not checked:
        return read_labels(path)
    closed = labelling_closed(run)
    if closed is not None:
        raise ConflictError(closed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".labels.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        closed = labelling_closed(run)  # closed while we waited for the lock
        if closed is not None:
            raise ConflictError(closed)
        write_labels(path, checked, by=by, keep=read_labels(path))
        return read_labels(path)

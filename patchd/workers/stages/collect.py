"""The ``collect`` stage: training data plus the labeled production slice → train/val/heldout.

Rules (documented for users in the run's manifest ``result``):

- ``data.train`` is loaded with :func:`patchd.ml.datasets.load_splits`; its train split is the
  base training set and its val split the validation set.
- held-out = the **test** split of ``data.heldout`` when set, else of ``data.train`` (the val
  split is used by trainers for selection, so it would flatter the candidate).
- The ``mine`` stage fits the miner on ``val`` plus the labeled production events that go to
  train (ids ``prod:<event id>``), and assigns groups to every train row (see
  :func:`patchd.workers.stages.learn.mining_fit_set`); the held-out share is never mined on.
- The production slice (``slice.jsonl``, labeled events exported by serve) is used when
  ``data.use_production_slice`` is true: each event with a ``file://`` (or plain path) input
  inside ``sources.allowed_roots`` is loaded, converted to the training images' channels and
  resized to their size. A stable hash of the event id sends 70 % of the usable events to
  train and 30 % to held-out, so the candidate is judged on production data it never saw.
- Replayed inputs: an event whose input is already a row of the dataset (the same file, for
  ``image-csv`` / ``wilds-metadata``, or the same 8-bit pixels at the training size, for any
  dataset) follows that row's split instead of the hash: a train or held-out image is not added
  again (it is already there; a copy on the other side would leak it), a val image goes to
  held-out only (val picks the epoch; it never trains the candidate). Two events with the same
  input count once. The counts are in the stage result (``slice_overlap``,
  ``slice_duplicates``, ``slice_to_train``, ``slice_to_heldout``).
- The incumbent (factory + weights) is loaded first so a broken model fails the run at once.
- An empty slice (no usable labeled events) is an error when ``data.use_production_slice`` is
  true: patching without production data would only re-fit the training set. Set it to false to
  patch from ``data.train`` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from patchd.exceptions import StageError
from patchd.workers import artifacts, runtime

if TYPE_CHECKING:
    import torch

    from patchd.config import Config
    from patchd.ml.data import ImageSet
    from patchd.runs.recipe import Recipe

log = logging.getLogger(__name__)

TRAIN_SHARE = 7  # of 10 hash buckets


@dataclass
class SliceRows:
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    groups: list[str | None] = field(default_factory=list)  # None: the event names no group
    ids: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)  # each event's resolved input file
    skipped: Counter[str] = field(default_factory=Counter)


def _uri_path(event: dict[str, Any]) -> str | None:
    src = event.get("input")
    uri = src.get("uri") if isinstance(src, dict) else event.get("input_uri")
    if not uri:
        return None
    parsed = urlparse(str(uri))
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path) if parsed.scheme else str(uri)
    return None


def contained(path: Path, roots: list[Path]) -> Path | None:
    """``path`` with symlinks resolved when it lies inside one of ``roots``, else None."""
    real = path.resolve()
    for root in roots:
        if real.is_relative_to(Path(root).resolve()):
            return real
    return None


def _group_key(event: dict[str, Any]) -> str | None:
    """The event's subgroup in the dataset's canonical naming (None: unknown group).

    ``groups`` (attribute → value) wins; a bare ``group_key`` (``"a=x,b=y"``) is re-ordered the
    same way. ``"all"`` (serve's key when no group attributes are configured) is unknown.
    """
    from patchd.ingest.records import NO_GROUPS_KEY
    from patchd.ml.data import group_name

    groups = event.get("groups")
    if isinstance(groups, dict) and groups:
        return group_name(groups)
    key = str(event.get("group_key") or "")
    if not key or key == NO_GROUPS_KEY:
        return None
    return group_name(dict(part.partition("=")[::2] for part in key.split(",")))


def _load_image(path: Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as src:
        img = src.convert("RGB" if channels == 3 else "L").resize((size[1], size[0]))
        arr = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(arr.copy())
    return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.unsqueeze(0)


def read_slice(path: Path, config: Config, like: ImageSet) -> SliceRows:
    rows = SliceRows()
    if not path.is_file():
        return rows
    channels, size = int(like.x.shape[1]), (int(like.x.shape[2]), int(like.x.shape[3]))
    for line in path.read_text().splitlines():
        if line.strip():
            _add_event(rows, json.loads(line), config, channels, size)
    return rows


def _add_event(
    rows: SliceRows, event: dict[str, Any], config: Config, channels: int, size: tuple[int, int]
) -> None:
    label = event.get("label")
    if label is None or not 0 <= int(label) < len(config.model.class_names):
        rows.skipped["no_or_bad_label"] += 1
        return
    raw = _uri_path(event)
    if raw is None:
        rows.skipped["no_file_input"] += 1
        return
    real = contained(Path(raw), list(config.sources.allowed_roots))
    if real is None or not real.is_file():
        rows.skipped["outside_roots_or_missing"] += 1
        return
    try:
        rows.images.append(_load_image(real, channels, size))
    except OSError:
        rows.skipped["unreadable_image"] += 1
        return
    rows.labels.append(int(label))
    rows.groups.append(_group_key(event))
    rows.ids.append(f"prod:{event.get('id')}")
    rows.paths.append(real)


def slice_imageset(rows: SliceRows, like: ImageSet) -> ImageSet:
    """The slice as an ImageSet sharing ``like``'s class and (extended) group names."""
    import torch

    from patchd.ml.data import UNKNOWN_GROUP, ImageSet

    names = list(like.group_names)
    for key in rows.groups:
        if key is not None and key not in names:
            names.append(key)
    index = [UNKNOWN_GROUP if k is None else names.index(k) for k in rows.groups]
    g = torch.tensor(index, dtype=torch.int64)
    return ImageSet(
        torch.stack(rows.images),
        torch.tensor(rows.labels, dtype=torch.int64),
        g,
        like.class_names,
        tuple(names),
        tuple(rows.ids),
    )


def _bucket(ident: str) -> int:
    return int(hashlib.sha256(ident.encode()).hexdigest()[:8], 16) % 10


def concat(a: ImageSet, b: ImageSet) -> ImageSet:
    """Rows of ``a`` then ``b``; ``b``'s group names must extend ``a``'s."""
    import torch

    from patchd.ml.data import ImageSet

    if tuple(b.group_names[: len(a.group_names)]) != tuple(a.group_names):
        raise StageError(f"cannot join data with groups {a.group_names} and {b.group_names}")
    return ImageSet(
        torch.cat([a.x, b.x]),
        torch.cat([a.y, b.y]),
        torch.cat([a.g, b.g]),
        a.class_names,
        b.group_names,
        a.ids + b.ids,
    )


def _regroup(data: ImageSet, names: tuple[str, ...]) -> ImageSet:
    """Same rows, group names extended to ``names`` (indices unchanged)."""
    return data.with_groups(data.g, names)


def _load_splits(spec: Any, what: str) -> Any:
    from patchd.exceptions import PatchdError
    from patchd.ml.datasets import load_splits

    try:
        return load_splits(spec)
    except PatchdError as err:
        raise StageError(f"{what} ({spec.kind}): {err}") from err
    except (OSError, ValueError, KeyError) as err:
        raise StageError(
            f"{what} ({spec.kind}) cannot be loaded: {type(err).__name__}: {err}"
        ) from err


def run(*, run_id: str, run_dir: Path, out: Path, recipe: Recipe, config: Config) -> dict[str, Any]:
    runtime.load_incumbent(recipe, config)  # fail fast: factory and weights must fit
    base = _load_splits(config.data.train, "data.train")
    heldout, held_spec = base.test, config.data.train
    if config.data.heldout is not None:
        heldout, held_spec = (
            _load_splits(config.data.heldout, "data.heldout").test,
            config.data.heldout,
        )
    train, val = base.train, base.val
    info: dict[str, Any] = {"slice_used": 0, "slice_skipped": {}, "slice_rule": SLICE_RULE}
    if config.data.use_production_slice:
        known = KnownInputs.of(
            (train, config.data.train, "train"),
            (val, config.data.train, "val"),
            (heldout, held_spec, "heldout"),
        )
        train, heldout, info = _with_slice(run_dir / "slice.jsonl", config, train, heldout, known)
    for name, data in (("train", train), ("val", val), ("heldout", heldout)):
        artifacts.save_imageset(data, out / f"{name}.safetensors")
    info.update(
        {
            "n_train": len(train),
            "n_val": len(val),
            "n_heldout": len(heldout),
            "train_groups": list(train.group_names),
            "heldout_groups": list(heldout.group_names),
            "class_names": list(train.class_names),
        }
    )
    return info


SLICE_RULE = "70/30 by id; inputs already in the dataset follow their split"
FILE_KINDS = ("image-csv", "wilds-metadata")  # datasets whose ids are ``<split>:<relative path>``


def pixel_digest(image: torch.Tensor) -> str:
    """sha256 of one image's 8-bit pixels (what a PNG of it holds), for finding replayed inputs."""
    import torch

    quantized = torch.round(image.float().clamp(0, 1) * 255).to(torch.uint8).contiguous()
    return hashlib.sha256(quantized.numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
class KnownInputs:
    """Which split each dataset input lies in, by pixel digest and (file datasets) by path."""

    by_digest: dict[str, str]
    by_path: dict[Path, str]

    @classmethod
    def of(cls, *parts: tuple[ImageSet, Any, str]) -> KnownInputs:
        by_digest: dict[str, str] = {}
        by_path: dict[Path, str] = {}
        for data, spec, split in parts:
            for i in range(len(data)):
                by_digest.setdefault(pixel_digest(data.x[i]), split)
            if spec.kind in FILE_KINDS and spec.root is not None:
                root = Path(spec.root)
                for ident in data.ids:
                    by_path.setdefault((root / ident.partition(":")[2]).resolve(), split)
        return cls(by_digest, by_path)

    def split_of(self, path: Path, digest: str) -> str | None:
        return self.by_path.get(path) or self.by_digest.get(digest)


@dataclass(frozen=True)
class SliceRouting:
    """Where each production row goes: ``True`` train, ``False`` held-out, ``None`` nowhere."""

    to_train: tuple[bool | None, ...]
    overlap: dict[str, int]  # dataset split -> events whose input is a row of it
    duplicates: int  # events whose input an earlier event already brought


def route_slice(rows: SliceRows, known: KnownInputs) -> SliceRouting:
    """The 70/30 hash split, except for inputs the dataset (or an earlier event) already has."""
    seen: set[str] = set()
    overlap: Counter[str] = Counter()
    out: list[bool | None] = []
    duplicates = 0
    for image, ident, path in zip(rows.images, rows.ids, rows.paths, strict=True):
        digest = pixel_digest(image)
        split = known.split_of(path, digest)
        if digest in seen:
            duplicates += 1
            out.append(None)
            continue
        seen.add(digest)
        if split is not None:
            overlap[split] += 1
        out.append(_destination(split, ident))
    return SliceRouting(tuple(out), dict(overlap), duplicates)


def _destination(split: str | None, ident: str) -> bool | None:
    if split is None:
        return _bucket(ident) < TRAIN_SHARE
    return False if split == "val" else None  # train / held-out rows are there already


def _with_slice(
    path: Path, config: Config, train: ImageSet, heldout: ImageSet, known: KnownInputs
) -> tuple[ImageSet, ImageSet, dict[str, Any]]:
    import torch

    rows = read_slice(path, config, train)
    info: dict[str, Any] = {
        "slice_used": len(rows.ids),
        "slice_skipped": dict(rows.skipped),
        "slice_rule": SLICE_RULE,
    }
    if not rows.ids:
        raise StageError(
            f"the production slice {path} has no usable labeled events "
            f"(skipped: {dict(rows.skipped) or 'none, the slice is empty'}); label predictions "
            "whose inputs are files inside sources.allowed_roots, or set "
            "data.use_production_slice: false to patch from data.train alone"
        )
    routing = route_slice(rows, known)
    to_train = torch.tensor([d is True for d in routing.to_train], dtype=torch.bool)
    to_held = torch.tensor([d is False for d in routing.to_train], dtype=torch.bool)
    info.update(
        {
            "slice_overlap": routing.overlap,
            "slice_duplicates": routing.duplicates,
            "slice_to_train": int(to_train.sum()),
            "slice_to_heldout": int(to_held.sum()),
        }
    )
    if not bool((to_train | to_held).any()):
        raise StageError(
            f"the production slice {path} brings no new data: all {len(rows.ids)} usable events "
            f"replay inputs the dataset already has (by split: {routing.overlap}, repeated "
            f"inputs: {routing.duplicates}); label new production inputs, or set "
            "data.use_production_slice: false to patch from data.train alone"
        )
    if routing.overlap or routing.duplicates:
        log.warning(
            "production slice %s: %d events replay dataset inputs %s and %d repeat an input; "
            "they follow the dataset's split (not added twice)",
            path,
            sum(routing.overlap.values()),
            routing.overlap,
            routing.duplicates,
        )
    prod = slice_imageset(rows, train)
    merged_train = concat(_regroup(train, train.group_names), prod.subset(to_train))
    held_names = _union(heldout.group_names, prod.group_names)
    merged_held = concat(
        _regroup(heldout, heldout.group_names), _remap(prod.subset(to_held), held_names)
    )
    return merged_train, merged_held, info


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*a, *b]))


def _remap(data: ImageSet, names: tuple[str, ...]) -> ImageSet:
    """Re-index ``data``'s groups into ``names`` (a superset of its group names)."""
    import torch

    index = torch.tensor([names.index(n) for n in data.group_names], dtype=torch.int64)
    g = torch.where(data.g >= 0, index[data.g.clamp(min=0)], data.g) if len(index) else data.g
    return data.with_groups(g, names)

"""Run artifacts: one directory per stage, published atomically with a verified manifest.

Layout: ``<artifacts>/runs/<run_id>/<stage>/`` holding the stage's files and ``manifest.json``
(``{"schema": 1, "stage", "run_id", "files": {relative name: sha256}, "result": {...}}``; the
manifest format and its verification are :mod:`patchd.runs.artifacts`, which serve reads too and
which publishes a stage to a bucket when ``artifacts.root`` is one).

A stage builds into ``<run_dir>/.tmp-<stage>-<random>/``, fsyncs every file, writes the manifest
last, renames the directory into place and fsyncs the run directory, so a reader sees either no
stage directory or a complete one. A stage whose directory already exists and verifies is done:
re-running it returns the manifest (idempotent re-run after a crash or a retry).

ImageSets and Augmentations are stored as safetensors plus a JSON sidecar (names, ids, info):
no pickle anywhere. Compact encodings (the sidecar names them; files without one are read as
before):

- an ImageSet's images are stored as ``uint8`` when that is lossless (every value is ``k/255``,
  as for images read from files); otherwise float32. Decoding gives the same float32 values.
- an Augmentation's paired translations are stored as the rows that differ from the training
  images (``paired.<name>.rows`` + ``paired.<name>.x``) in ``artifacts.augmentation_dtype``
  (``uint8`` by default: a translated pixel moves by at most 1/510; ``float16``, or ``float32``
  for exact values); the other rows are the training images themselves, restored bit for bit.
  Extra samples use the same dtype.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.digests import sha256_file
from patchd.exceptions import IntegrityError
from patchd.runs.artifacts import MANIFEST, SCHEMA, StageManifest, stage_files, verify

if TYPE_CHECKING:
    import torch

    from patchd.abc import Augmentation
    from patchd.ml.data import ImageSet

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def run_dir(artifacts_root: Path, run_id: str) -> Path:
    return Path(artifacts_root) / "runs" / run_id


def stage_dir(artifacts_root: Path, run_id: str, stage: str) -> Path:
    return run_dir(artifacts_root, run_id) / stage


def existing(directory: Path) -> StageManifest | None:
    """The verified manifest when the stage is done, else None (a bad dir is moved aside)."""
    if not directory.exists():
        return None
    try:
        return verify(directory)
    except IntegrityError as err:
        aside = directory.with_name(f".bad-{directory.name}-{time.time_ns()}")
        log.warning("stage dir %s does not verify (%s); moving it to %s", directory, err, aside)
        os.replace(directory, aside)
        return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clear_stale_temps(parent: Path, stage: str) -> int:
    """Remove temp dirs a killed attempt of ``stage`` left behind; returns how many."""
    if not parent.exists():
        return 0
    stale = list(parent.glob(f"{TMP_PREFIX}{stage}-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh temp dir beside ``final``; removed if the block raises (see :func:`publish`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    removed = clear_stale_temps(final.parent, final.name)
    if removed:
        log.info("removed %d stale temp dir(s) of %s", removed, final)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, final: Path, run_id: str, result: dict[str, Any]) -> StageManifest:
    """fsync the files, write the manifest, rename ``tmp`` to ``final``, fsync the parent."""
    files = {}
    for path in stage_files(tmp):
        _fsync_path(path)
        files[path.relative_to(tmp).as_posix()] = sha256_file(path)
    manifest = StageManifest(final.name, run_id, files, result)
    (tmp / MANIFEST).write_text(manifest.to_json())
    _fsync_path(tmp / MANIFEST)
    done = existing(final)
    if done is not None:  # another attempt won the race: keep its output, drop ours
        shutil.rmtree(tmp, ignore_errors=True)
        return done
    os.rename(tmp, final)
    _fsync_path(final.parent)
    return manifest


@dataclass(frozen=True)
class DiskUse:
    stage_bytes: int  # the stage being built
    run_bytes: int  # everything under the run directory, that stage included


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a file: its size; missing: 0)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_disk(run: Path, tmp: Path, max_run_mb: float | None) -> DiskUse:
    """The disk use of the stage in ``tmp`` and of the whole run; StageError past the bound."""
    from patchd.exceptions import StageError

    use = DiskUse(tree_bytes(tmp), tree_bytes(run))
    if max_run_mb is not None and use.run_bytes > max_run_mb * MB:
        stage = tmp.name.removeprefix(TMP_PREFIX).rsplit("-", 1)[0]
        raise StageError(
            f"run {run.name} would take {use.run_bytes / MB:.1f} MB on disk with this stage's "
            f"{use.stage_bytes / MB:.1f} MB ({stage}), over artifacts.max_run_disk_mb = "
            f"{max_run_mb:g}; raise the bound, use less data (data.train.n_train, image_size) "
            "or keep artifacts.augmentation_dtype at uint8"
        )
    return use


MB = 1 << 20


# --- tensors as safetensors + JSON sidecar -------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


ENCODINGS = ("uint8", "float16", "float32")


def encode(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Images in [0, 1] as ``dtype`` (``uint8``: round(x * 255))."""
    import torch

    if dtype == "uint8":
        return torch.round(x.float().clamp(0.0, 1.0) * 255.0).to(torch.uint8).contiguous()
    if dtype == "float16":
        return x.to(torch.float16).contiguous()
    if dtype == "float32":
        return x.to(torch.float32).contiguous()
    raise ValueError(f"unknown image encoding {dtype!r}; use one of {ENCODINGS}")


def decode(stored: torch.Tensor) -> torch.Tensor:
    """float32 images from :func:`encode`'s output (uint8 / 255, or a float widened)."""
    import torch

    if stored.dtype == torch.uint8:
        return stored.to(torch.float32) / 255.0
    return stored.to(torch.float32)


def lossless_encoding(x: torch.Tensor) -> str:
    """``uint8`` when decoding it gives back exactly ``x`` (float32), else ``float32``."""
    import torch

    if x.dtype == torch.float32 and len(x) and torch.equal(decode(encode(x, "uint8")), x):
        return "uint8"
    return "float32"


def save_imageset(data: ImageSet, path: Path) -> None:
    """``path`` is ``<dir>/<name>.safetensors``; the names and ids go to ``<name>.json``."""
    from safetensors.torch import save_file

    encoding = lossless_encoding(data.x)
    x = encode(data.x, encoding) if encoding == "uint8" else data.x.contiguous()
    tensors = {"x": x, "y": data.y.contiguous(), "g": data.g.contiguous()}
    save_file(tensors, str(path))
    meta = {
        "schema": SCHEMA,
        "class_names": list(data.class_names),
        "group_names": list(data.group_names),
        "ids": list(data.ids),
        "x_encoding": encoding,
    }
    _write_json(path.with_suffix(".json"), meta)


def load_imageset(path: Path) -> ImageSet:
    from safetensors.torch import load_file

    from patchd.ml.data import ImageSet

    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    return ImageSet(
        x=decode(tensors["x"]),
        y=tensors["y"],
        g=tensors["g"],
        class_names=tuple(meta["class_names"]),
        group_names=tuple(meta["group_names"]),
        ids=tuple(meta["ids"]),
    )


def _changed_rows(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Indices of the rows of ``x`` that differ from ``base`` anywhere."""
    return (x != base).reshape(len(x), -1).any(dim=1).nonzero(as_tuple=True)[0]


def save_augmentation(
    aug: Augmentation, path: Path, base: torch.Tensor | None = None, dtype: str = "float32"
) -> None:
    """Paired translations as the rows that differ from ``base`` (the training images they are
    aligned with) in ``dtype``; without ``base``, whole. Extra samples as ``extra.{x,y,g}``."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    paired_meta: dict[str, dict[str, Any]] = {}
    for key, value in aug.paired.items():
        if base is not None and value.shape == base.shape:
            rows = _changed_rows(value, base)
            tensors[f"paired.{key}.rows"] = rows.to(torch.int64).contiguous()
            tensors[f"paired.{key}.x"] = encode(value[rows], dtype)
            paired_meta[key] = {"layout": "rows", "dtype": dtype, "n_rows": int(len(rows))}
        else:
            tensors[f"paired.{key}"] = encode(value, dtype)
            paired_meta[key] = {"layout": "full", "dtype": dtype}
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": aug.kind,
        "info": aug.info,
        "previews": [p.name for p in aug.previews],
        "extra": None,
        "paired": paired_meta,
    }
    if aug.extra is not None:
        tensors.update(
            {
                "extra.x": encode(aug.extra.x, dtype),
                "extra.y": aug.extra.y.contiguous(),
                "extra.g": aug.extra.g.contiguous(),
            }
        )
        meta["extra"] = {
            "class_names": list(aug.extra.class_names),
            "group_names": list(aug.extra.group_names),
            "ids": list(aug.extra.ids),
        }
    save_file(tensors, str(path))
    _write_json(path.with_suffix(".json"), meta)


def _paired(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], base: torch.Tensor | None, path: Path
) -> dict[str, torch.Tensor]:
    layouts = meta.get("paired")
    if layouts is None:  # written before the compact layout: whole float tensors
        return {k.removeprefix("paired."): v for k, v in tensors.items() if k.startswith("paired.")}
    out = {}
    for key, layout in layouts.items():
        if layout["layout"] == "full":
            out[key] = decode(tensors[f"paired.{key}"])
            continue
        if base is None:
            raise IntegrityError(
                f"{path}: paired {key!r} is stored as changed rows; pass the training images"
            )
        rows = tensors[f"paired.{key}.rows"]
        if len(rows) and int(rows.max()) >= len(base):
            raise IntegrityError(
                f"{path}: paired {key!r} names row {int(rows.max())} of {len(base)} training images"
            )
        full = base.clone()
        full[rows] = decode(tensors[f"paired.{key}.x"])
        out[key] = full
    return out


def load_augmentation(path: Path, base: torch.Tensor | None = None) -> Augmentation:
    """The augmentation at ``path``; ``base``: the training images its paired rows refer to."""
    from safetensors.torch import load_file

    from patchd.abc import Augmentation
    from patchd.ml.data import ImageSet

    tensors = load_file(str(path))
    meta = json.loads(path.with_suffix(".json").read_text())
    paired = _paired(tensors, meta, base, path)
    extra = None
    if meta.get("extra") is not None:
        e = meta["extra"]
        extra = ImageSet(
            decode(tensors["extra.x"]),
            tensors["extra.y"],
            tensors["extra.g"],
            tuple(e["class_names"]),
            tuple(e["group_names"]),
            tuple(e["ids"]),
        )
    previews = tuple(path.parent / "previews" / name for name in meta.get("previews", []))
    return Augmentation(
        kind=meta["kind"],
        paired=paired,
        extra=extra,
        previews=previews,
        info=dict(meta.get("info", {})),
    )

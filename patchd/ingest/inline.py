"""Inline inputs (``{"base64": ...}``): decoded as an image before anything touches the disk.

:func:`check_image` decodes the bytes with Pillow (PNG or JPEG only, at most
``sources.max_image_pixels`` pixels, checked from the header before the pixels are decoded) and
returns the file extension; anything else is a ``ValidationError``. The parser only *plans* a
file (:class:`InlineInput`); :class:`InputStore` writes the planned files of the records that
passed validation, content-addressed under ``<artifacts>/inputs/<sha256>.<ext>``, and refuses
(``inputs_full``) once the directory holds ``sources.max_inputs_bytes``. A full disk while
writing raises :class:`~patchd.exceptions.DiskFullError` (HTTP 503 + Retry-After): the batch is
not queued, so the sender's retry loses nothing. Retention removes files no prediction refers to.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from patchd.exceptions import DiskFullError, ValidationError
from patchd.store.blobs import write_atomic

log = logging.getLogger(__name__)

FORMATS = {"PNG": "png", "JPEG": "jpg"}
RESCAN_S = 60.0
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class InlineInput:
    """A validated inline image, to be written to ``path`` if its record is accepted."""

    path: Path
    data: bytes

    @property
    def uri(self) -> str:
        return self.path.as_uri()


def check_image(raw: bytes, max_pixels: int, field: str = "input.base64") -> str:
    """The extension (``png``/``jpg``) of a PNG or JPEG that decodes fully; ValidationError else."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                ext = FORMATS.get(str(img.format))
                if ext is None:
                    raise ValidationError(
                        "invalid_value", f"a {img.format} image; only PNG or JPEG", field=field
                    )
                width, height = img.size
                if width * height > max_pixels:
                    raise ValidationError(
                        "too_large",
                        f"{width}x{height} image over {max_pixels} pixels "
                        "(sources.max_image_pixels)",
                        field=field,
                    )
                img.load()
    except ValidationError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Warning) as err:
        message = f"not a decodable PNG or JPEG image ({type(err).__name__}: {str(err)[:120]})"
        raise ValidationError("invalid_value", message, field=field) from None
    return ext


class InputStore:
    """The ``inputs`` directory: writes planned inline inputs under a total-size cap."""

    def __init__(self, root: Path, max_bytes: int, max_pixels: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self._used: int | None = None  # bytes on disk, rescanned every RESCAN_S (retention)
        self._scanned_at = 0.0
        self._lock = threading.Lock()

    def plan(self, raw: bytes) -> InlineInput:
        """Validate ``raw`` as an image; its future path (nothing written yet)."""
        ext = check_image(raw, self.max_pixels)
        return InlineInput(self.root / f"{hashlib.sha256(raw).hexdigest()}.{ext}", raw)

    def has_room(self, size: int) -> bool:
        with self._lock:
            return self._usage() + size <= self.max_bytes

    def write(self, items: Iterable[InlineInput]) -> None:
        """Write each file that is not there yet. Raises DiskFullError (nothing else)."""
        for item in items:
            if item.path.exists():
                continue
            try:
                write_atomic(item.path, item.data)
            except OSError as err:  # write_atomic left no temp file behind
                if err.errno in _NO_SPACE:
                    raise DiskFullError(f"cannot write {item.path.parent}") from None
                raise DiskFullError(f"cannot write {item.path}: {err.strerror}") from None
            with self._lock:
                self._used = self._usage() + len(item.data)

    def rescan(self) -> int:
        """Recount the bytes on disk (after retention deleted files)."""
        with self._lock:
            self._used = None
            return self._usage()

    def _usage(self) -> int:
        now = time.monotonic()
        if self._used is None or now - self._scanned_at > RESCAN_S:
            self._used = directory_bytes(self.root)
            self._scanned_at = now
        return self._used


def directory_bytes(root: Path) -> int:
    return sum(e.stat().st_size for e in _entries(root) if e.is_file(follow_symlinks=False))


def _entries(root: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(root) as it:
            return list(it)
    except FileNotFoundError:
        return []

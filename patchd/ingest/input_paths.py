"""Allow-listed ``input`` URIs at ingest rate: the resolution of parent directories is cached.

``InputResolver(roots).file_uri(uri)`` returns what
``resolve_input_path(uri).as_uri()`` after ``check_inside`` returns (same errors), but costs one
``lstat`` instead of one per path component plus ``pathlib`` work (~90 us per event before).

Why it is the same answer: ``os.path.realpath`` resolves components left to right, so for
``<dir>/<name>`` whose last component is not a symlink it is ``realpath(<dir>)/<name>``. The
directory part is cached for :data:`DIR_TTL_S` seconds (a directory swapped for a symlink is
noticed within that time; the file itself is checked on every event). A last component that is a
symlink, ``.``/``..``, or missing takes the full ``os.path.realpath`` path, uncached.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from urllib.parse import quote_from_bytes

from patchd.exceptions import PathNotAllowedError
from patchd.ingest.fields import input_path_text

DIR_TTL_S = 0.25
DIR_CACHE_MAX = 4096


class InputResolver:
    """``input`` URI → ``file://`` URI of the resolved path, inside one of ``roots`` or raise."""

    def __init__(self, roots: tuple[Path, ...], ttl_s: float = DIR_TTL_S) -> None:
        self.roots = roots
        self._prefixes = tuple(str(r).rstrip("/") + "/" for r in roots)
        self._exact = frozenset(str(r) for r in roots)
        self.ttl_s = ttl_s
        self._dirs: dict[str, tuple[str, float]] = {}  # dir as written -> (realpath, expiry)

    def file_uri(self, uri: str) -> str:
        """Raises ValidationError (bad URI) or PathNotAllowedError (outside every root)."""
        real = self.realpath(input_path_text(uri))
        if real not in self._exact and not real.startswith(self._prefixes):
            raise PathNotAllowedError(uri[:200], [str(r) for r in self.roots])
        return "file://" + quote_from_bytes(os.fsencode(real))

    def realpath(self, text: str) -> str:
        """``os.path.realpath(text)`` for an absolute ``text``."""
        head, _, name = text.rpartition("/")
        if name in ("", ".", ".."):
            return os.path.realpath(text)
        real_dir = self._real_dir(head or "/")
        candidate = real_dir.rstrip("/") + "/" + name
        try:
            mode = os.lstat(candidate).st_mode
        except OSError:
            return os.path.realpath(text)
        return os.path.realpath(text) if stat.S_ISLNK(mode) else candidate

    def _real_dir(self, head: str) -> str:
        now = time.monotonic()
        found = self._dirs.get(head)
        if found is not None and found[1] > now:
            return found[0]
        if len(self._dirs) >= DIR_CACHE_MAX:
            self._dirs.clear()
        real = os.path.realpath(head)
        self._dirs[head] = (real, now + self.ttl_s)
        return real

"""The append-only audit log of promotion decisions: ``<state_dir>/audit.log``, one JSON line each.

Each entry is written with one ``write`` on an ``O_APPEND`` descriptor and fsynced before
:meth:`AuditLog.append` returns, so a decision the API acknowledged is on disk, and concurrent
writers (serve, an offline ``patchd registry import``) never interleave inside a line.
The file is never rewritten; a torn last line (power loss mid-write) is skipped by :meth:`read`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AUDIT_SCHEMA = 1
# A person's name given with a decision (``--by``, the UI's name field): printable, 1-64 chars.
PERSON_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]{1,64}$"


def actor_name(token_name: str, person: str | None) -> str:
    """Who decided: ``"alice (token admin)"`` when a person is named, else the token's name."""
    person = (person or "").strip()
    return f"{person} (token {token_name})" if person else token_name


@dataclass(frozen=True)
class AuditEntry:
    actor: str  # token name, "alice (token admin)" with a named person; "gate" when automatic
    action: str  # evaluated|approved|rejected|expired|promoted|rolled_back|imported|auto_promoted
    model: str
    digest: str | None = None
    candidate: str | None = None
    previous: str | None = None  # production digest before the action
    metrics: dict[str, Any] = field(default_factory=dict)  # worst-group, average, deltas, verdict
    detail: str = ""
    ts: float = field(default_factory=time.time)
    schema: int = AUDIT_SCHEMA

    def to_line(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode() + b"\n"


class AuditLog:
    """Append-only JSONL file; thread-safe and safe across processes (``O_APPEND``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> AuditLog:
        return cls(Path(state_dir) / "audit.log")

    def append(self, entry: AuditEntry) -> None:
        """Write one line and fsync it before returning."""
        line = entry.to_line()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        log.info(
            "audit: %s %s %s by %s",
            entry.action,
            entry.model,
            entry.candidate or (entry.digest or "")[:12],
            entry.actor,
        )

    def read(self) -> list[AuditEntry]:
        """Every complete entry, oldest first."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for number, line in enumerate(raw.splitlines(), 1):
            try:
                out.append(AuditEntry(**json.loads(line)))
            except (ValueError, TypeError):
                log.warning("audit log %s line %d is torn or invalid; skipped", self.path, number)
        return out

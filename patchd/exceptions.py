"""The one exception hierarchy of patchd.

Every error patchd raises on purpose derives from :class:`PatchdError`. Subclasses that mirror a
builtin also derive from it (``NotFoundError`` is a ``LookupError``) so callers can catch either.
Messages say what happened, the value involved, and how to fix it.
"""

from __future__ import annotations


class PatchdError(Exception):
    """Root of every error patchd raises deliberately."""


class ConfigError(PatchdError, ValueError):
    """The configuration is invalid; the message names each bad field, its value and the fix."""


class ValidationError(PatchdError, ValueError):
    """One input record (an event, a label, a request body) is invalid."""

    def __init__(self, reason: str, message: str, *, field: str | None = None) -> None:
        self.reason = reason  # short machine-readable code, used as a metric label
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class PathNotAllowedError(ValidationError):
    """A path or URI resolves outside the configured allow-listed roots."""

    def __init__(self, path: str, roots: list[str]) -> None:
        super().__init__(
            "path_not_allowed",
            f"{path!r} is outside the allowed roots {roots}; add its root to the config "
            "(sources.allowed_roots) or move the file",
        )


class NotFoundError(PatchdError, LookupError):
    """A named thing (model, run, candidate, version) does not exist."""

    def __init__(self, kind: str, ident: str) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident!r} not found")


class ConflictError(PatchdError):
    """The request conflicts with the current state (stale digest, run already open, ...)."""


class StoreError(PatchdError):
    """The store cannot be opened or migrated."""


class QueueFullError(PatchdError):
    """The bounded ingest queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"ingest queue full, retry after {retry_after:.0f}s")


class DependencyMissingError(PatchdError):
    """An external program or optional package is missing; the message gives the install hint."""


class PluginError(PatchdError):
    """A plugin cannot be imported or built from its configured name or dotted path."""


class StageError(PatchdError):
    """A patch-run stage failed for a reason the user can act on (bad data, bad weights...)."""


class IntegrityError(PatchdError):
    """An artifact or model file does not match its recorded digest."""


class DatasetError(StageError):
    """A dataset (CSV, metadata, image files) is malformed; the message names the file and row."""


class DiskFullError(PatchdError):
    """A disk serve writes (the store, artifacts/inputs) is full; retry after ``retry_after``."""

    def __init__(self, what: str, retry_after: float = 30.0) -> None:
        self.retry_after = retry_after
        super().__init__(f"disk full: {what}; free space or raise the limit, then retry")


class NotLeaderError(PatchdError):
    """This serve replica is not the leader, so it does not do leader duties (HTTP 503)."""

    def __init__(self, action: str, leader: str, leader_url: str | None = None) -> None:
        self.action = action
        self.leader = leader
        self.leader_url = leader_url
        super().__init__(
            f"{action}: this replica is not the leader; the leader is {leader} "
            "(send it there, or retry: a new leader is elected within leader.ttl_s)"
        )


class FencedError(NotLeaderError):
    """A leader write carried an epoch older than the store's: a newer leader took over."""

    def __init__(self, action: str, epoch: int, stored: int) -> None:
        self.epoch = epoch
        self.stored = stored
        super().__init__(action, f"a replica of epoch {stored}")
        self.args = (
            f"{action}: refused, this replica's leader epoch {epoch} is older than the store's "
            f"{stored} (a newer leader took over); nothing was written",
        )

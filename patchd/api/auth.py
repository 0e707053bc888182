"""Bearer-token authentication for the admin API, with scopes ``read``, ``ingest``, ``approve``
and ``admin`` (operating serve itself: ``POST /v1/config/reload``).

Tokens come from the environment variable ``PATCHD_TOKEN`` (all scopes, name ``env``) and from
``api.token_file``: one token per line, ``<token> <scope[,scope]> [name]`` (``#`` comments). When
neither is configured, serve writes a random admin token to ``<state_dir>/admin.token`` (mode 0600)
and logs the path. Every comparison uses :func:`hmac.compare_digest` against every known token,
so the time taken does not depend on which token (if any) matched.

In a route::

    @router.post("/v1/runs")
    def trigger(principal: Principal = Depends(require_scope("approve"))) -> ...
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request

from patchd.config import Config
from patchd.exceptions import ConfigError

log = logging.getLogger(__name__)

SCOPES = frozenset({"read", "ingest", "approve", "admin"})
ADMIN_TOKEN_FILE = "admin.token"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


class TokenStore:
    """The known tokens; :meth:`authenticate` compares in constant time."""

    def __init__(self, entries: list[tuple[str, Principal]]) -> None:
        self._entries = [(token.encode(), principal) for token, principal in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        given = token.encode()
        found: Principal | None = None
        for known, principal in self._entries:  # no early exit: the time does not leak a match
            if hmac.compare_digest(given, known) and found is None:
                found = principal
        return found

    @classmethod
    def from_config(cls, config: Config, environ: Mapping[str, str]) -> TokenStore:
        """Env token + token file; generates ``<state_dir>/admin.token`` when there is neither."""
        entries: list[tuple[str, Principal]] = []
        env_token = environ.get("PATCHD_TOKEN", "")
        if env_token:
            entries.append((_checked(env_token, "PATCHD_TOKEN"), Principal("env", SCOPES)))
        if config.api.token_file is not None:
            entries.extend(read_token_file(config.api.token_file))
        if not entries:
            entries.append((ensure_admin_token(config.state_dir), Principal("admin", SCOPES)))
        return cls(entries)


def _checked(token: str, where: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"{where}: a token must have at least {MIN_TOKEN_CHARS} characters "
            "(generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return token


def read_token_file(path: Path) -> list[tuple[str, Principal]]:
    """Parse ``<token> <scope[,scope]> [name]`` lines; errors name the line.

    The file must be private (:func:`check_private`): a token file others can read is refused.
    """
    try:
        check_private(path)
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"api.token_file: cannot read {path}: {err.strerror}") from None
    entries = []
    for number, line in enumerate(lines, 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        where = f"api.token_file {path} line {number}"
        if len(parts) not in (2, 3):
            raise ConfigError(f"{where}: expected '<token> <scope[,scope]> [name]'")
        scopes = frozenset(parts[1].split(","))
        if not scopes <= SCOPES:
            raise ConfigError(
                f"{where}: unknown scope {sorted(scopes - SCOPES)}; use {sorted(SCOPES)}"
            )
        name = parts[2] if len(parts) == 3 else f"token{number}"
        entries.append((_checked(parts[0], where), Principal(name, scopes)))
    return entries


def check_private(path: Path) -> None:
    """ConfigError when accounts other than serve's could read or change the secret ``path``.

    Refused: any permission for others, write for the group, and read for a group that is not
    one of this process's own (a Kubernetes Secret mounted ``0440`` with ``fsGroup`` = serve's
    group passes; ``0644`` does not).
    """
    st = os.stat(path)
    mode = stat.S_IMODE(st.st_mode)
    own_group = st.st_gid == os.getegid() or st.st_gid in os.getgroups()
    if mode & 0o007 or mode & 0o020 or (mode & 0o040 and not own_group):
        raise ConfigError(
            f"api.token_file {path} has mode {mode:04o}: other accounts can read its tokens; "
            f"run `chmod 600 {path}` (or 0640 with serve's own group)"
        )


def ensure_admin_token(state_dir: Path) -> str:
    """Read ``<state_dir>/admin.token``, creating it (0600, 32 random bytes) when missing."""
    path = state_dir / ADMIN_TOKEN_FILE
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("no API token configured: wrote an admin token to %s (mode 0600)", path)
    return token


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def require_scope(scope: str) -> Callable[[Request], Awaitable[Principal]]:
    """A FastAPI dependency: 401 without a valid token, 403 without ``scope``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; use one of {sorted(SCOPES)}")

    async def dependency(request: Request) -> Principal:
        tokens: TokenStore = request.app.state.tokens
        token = bearer(request)
        principal = tokens.authenticate(token) if token else None
        if principal is None:
            raise HTTPException(
                401, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        if scope not in principal.scopes:
            raise HTTPException(403, f"token {principal.name!r} lacks the {scope!r} scope")
        return principal

    return dependency

"""Login sessions and CSRF protection of the approval pages.

A person logs in by pasting a token with the ``read`` or ``approve`` scope into the login form
(a POST body: a token never appears in a URL), with their name (optional; their decisions are
recorded as ``"<name> (token <token name>)"``). Serve answers with a random session id in an
``HttpOnly``, ``SameSite=Strict`` cookie scoped to ``/ui`` (``Secure`` with ``ui.secure_cookie``);
sessions live in serve's memory only, so a restart logs everyone out. Only the sha256 of a session
id is kept.

Every state-changing form carries the session's CSRF token (synchronizer pattern), compared in
constant time; the login form carries one bound to a short-lived pre-login cookie. On top of that a
POST whose ``Origin`` (or, without one, ``Sec-Fetch-Site``) says it came from another origin is
refused before its token is looked at.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from patchd.api.auth import Principal
from patchd.promotion.audit import actor_name

SESSION_COOKIE = "patchd_session"
LOGIN_COOKIE = "patchd_login"
COOKIE_PATH = "/ui"
LOGIN_TTL_S = 600.0
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class Session:
    principal: Principal
    csrf: str
    expires_at: float
    person: str = ""  # the name given at login; decisions record it beside the token's name

    @property
    def can_approve(self) -> bool:
        return "approve" in self.principal.scopes

    @property
    def actor(self) -> str:
        """Who decides, as the audit log records it (``"alice (token admin)"``)."""
        return actor_name(self.principal.name, self.person)


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


class SessionStore:
    """Sessions by the hash of their id; expired ones are dropped when met or when full."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(
        self, principal: Principal, now: float | None = None, person: str = ""
    ) -> tuple[str, Session]:
        """A new session for ``principal`` (and the person who logged in): (cookie, session)."""
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32), now + self.ttl_s, person)
        with self._lock:
            if len(self._sessions) >= MAX_SESSIONS:
                self._sweep(now)
            if len(self._sessions) >= MAX_SESSIONS:  # still full: the oldest goes
                oldest = min(self._sessions, key=lambda k: self._sessions[k].expires_at)
                del self._sessions[oldest]
            self._sessions[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        if not session_id:
            return None
        now = time.time() if now is None else now
        key = _key(session_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and session.expires_at <= now:
                del self._sessions[key]
                return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(_key(session_id), None)

    def _sweep(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]


def tokens_match(given: str | None, expected: str | None) -> bool:
    """Constant-time comparison; False when either is missing."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def same_origin(
    headers: Mapping[str, str], scheme: str, also: frozenset[str] = frozenset()
) -> bool:
    """False when the browser says the request came from another origin.

    ``Origin`` must be ``<scheme>://<Host>`` (or one of ``also``: the origin of ``ui.public_url``
    behind a TLS proxy); without an ``Origin`` a ``Sec-Fetch-Site`` other than
    ``same-origin``/``none`` is refused; a client that sends neither (not a browser) passes here
    and still needs the CSRF token.
    """
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None:
        return origin == f"{scheme}://{host}" or origin in also
    site = headers.get("sec-fetch-site")
    return site is None or site in ("same-origin", "none")


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def origin_of(url: str | None) -> frozenset[str]:
    """``{"https://host[:port]"}`` of a configured public URL (empty when none)."""
    if not url:
        return frozenset()
    parts = urlsplit(url)
    return frozenset({f"{parts.scheme}://{parts.netloc}"}) if parts.netloc else frozenset()

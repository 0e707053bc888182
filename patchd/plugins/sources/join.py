"""Request/response join for logger CloudEvents, with a TTL and bounded memory.

Model-server loggers (KServe, Seldon) send one event for the request and one for the response,
with the same join key, in any order, at most once, sometimes twice, sometimes never. The joiner
keeps each lone half until its partner arrives or ``ttl_s`` passes; expired halves are orphans.
At most ``max_pending`` halves (and ``max_bytes`` of them, as weighed by ``weigh``) are buffered:
past that the oldest is expired early (an orphan).
Halves whose pair was completed within the last ``ttl_s`` are recognised as duplicates.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

Half = Literal["request", "response"]
T = TypeVar("T")


@dataclass(frozen=True)
class Joined(Generic[T]):
    key: str
    request: T | None
    response: T | None


@dataclass(frozen=True)
class JoinOutcome(Generic[T]):
    """What one arriving half did: ``pair`` is set when it completed a pair."""

    status: Literal["buffered", "joined", "duplicate"]
    pair: Joined[T] | None = None


@dataclass(frozen=True)
class JoinCounts:
    pending: int
    joined: int
    duplicates: int
    orphan_requests: int
    orphan_responses: int


class PairJoiner(Generic[T]):
    """Thread-safe join of request and response halves by key."""

    def __init__(
        self,
        ttl_s: float,
        max_pending: int,
        *,
        max_bytes: int | None = None,
        weigh: Callable[[T], int] = lambda value: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.max_bytes = max_bytes if max_bytes is not None else 1 << 62
        self._weigh = weigh
        self._bytes = 0
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[float, Half, T]] = OrderedDict()
        self._done: OrderedDict[str, float] = OrderedDict()  # recently joined keys -> expiry
        self._joined = self._duplicates = 0
        self._orphans = {"request": 0, "response": 0}

    def add(self, key: str, half: Half, value: T) -> tuple[JoinOutcome[T], list[Joined[T]]]:
        """Offer one half; returns its outcome and the orphans that expired meanwhile."""
        now = self._clock()
        with self._lock:
            outcome = self._add(key, half, value, now)
            expired = self._expire(now)
        return outcome, expired

    def _add(self, key: str, half: Half, value: T, now: float) -> JoinOutcome[T]:
        if key in self._done:
            self._duplicates += 1
            return JoinOutcome("duplicate")
        waiting = self._pending.get(key)
        if waiting is not None and waiting[1] == half:
            self._duplicates += 1
            return JoinOutcome("duplicate")
        if waiting is None:
            self._pending[key] = (now + self.ttl_s, half, value)
            self._bytes += self._weigh(value)
            return JoinOutcome("buffered")
        del self._pending[key]
        self._bytes -= self._weigh(waiting[2])
        self._done[key] = now + self.ttl_s
        self._joined += 1
        other = waiting[2]
        req, resp = (value, other) if half == "request" else (other, value)
        return JoinOutcome("joined", Joined(key, req, resp))

    def restore(self, pair: Joined[T], half: Half) -> None:
        """Undo a join whose events could not be submitted: the ``half`` partner waits again,
        so a retried delivery of the other half completes the pair."""
        with self._lock:
            self._done.pop(pair.key, None)
            self._joined -= 1
            value = pair.request if half == "request" else pair.response
            if value is not None:
                self._pending[pair.key] = (self._clock() + self.ttl_s, half, value)
                self._bytes += self._weigh(value)

    def expire(self) -> list[Joined[T]]:
        """Expire what is due now (called by a periodic sweep); returns the orphans."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> list[Joined[T]]:
        done = self._done
        while done and (next(iter(done.values())) <= now or len(done) > self.max_pending):
            done.popitem(last=False)
        out: list[Joined[T]] = []
        while self._pending:
            key, (deadline, half, value) = next(iter(self._pending.items()))
            full = len(self._pending) > self.max_pending or self._bytes > self.max_bytes
            if deadline > now and not full:
                break
            del self._pending[key]
            self._bytes -= self._weigh(value)
            self._orphans[half] += 1
            out.append(Joined(key, value, None) if half == "request" else Joined(key, None, value))
        return out

    def drain(self) -> list[Joined[T]]:
        """Expire everything (shutdown)."""
        with self._lock:
            return self._expire(float("inf"))

    def counts(self) -> JoinCounts:
        with self._lock:
            return JoinCounts(
                len(self._pending),
                self._joined,
                self._duplicates,
                self._orphans["request"],
                self._orphans["response"],
            )

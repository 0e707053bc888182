"""Leadership of several ``patchd serve`` replicas: a Redis lease with a fencing epoch.

Every replica ingests and answers reads; exactly one, the leader, does the duties that must
happen once: monitor ticks (and so triggers), run reconciliation and polling, candidate expiry,
store retention, promotions and rollbacks. Scheduler jobs of those duties are wrapped in
:meth:`Leadership.guard` (a follower skips them); action methods call :meth:`Leadership.require`
(a follower raises :class:`~patchd.exceptions.NotLeaderError`, HTTP 503 naming the leader).

The lease (``leader.key``, default ``<redis.queue_prefix>:leader``) is a Redis string set with
``SET key value NX PX ttl`` inside one Lua script that also ``INCR``\\ s ``<key>:epoch``: each
acquisition gets a strictly larger epoch (the fencing token). The value is JSON naming the holder
(identity ``hostname:pid:random``, epoch, URL). Renew (``PEXPIRE``) and release (``DEL``) are Lua
compare-and-set on that exact value, so a replica never extends or deletes another's lease.
A background thread renews every ``renew_interval_s`` (default ttl/3) and, as a follower, tries to
acquire at the same pace. This replica counts itself leader only until ``sent + ttl * 0.8`` of
its last successful renewal (``sent``: the monotonic time the renew was sent, before Redis set
the new expiry), so it stops acting before Redis lets another replica in, even when the renewal
thread is stuck; a SIGSTOPped process sees the deadline passed the moment it runs again.

Fencing (why a paused ex-leader cannot act): the local deadline alone cannot stop a thread that
had already passed its check when the process was paused. So every leader write that matters
(creating or changing a run, a candidate, a promotion) runs in a store transaction that first
executes :func:`fence`: a single conditional upsert of the kv row ``leader:epoch`` that succeeds
only when the stored epoch is <= this replica's and records it. A new leader records its epoch
in the store right after acquiring (before any duty), so from then on every transaction of the
old epoch aborts (:class:`~patchd.exceptions.FencedError`, logged with both epochs) and nothing
it did in that transaction is kept. On SQLite, write transactions are serialised across
processes (``BEGIN IMMEDIATE``); on Postgres the upsert locks the kv row, so fenced transactions
are serialised too and a waiting stale one re-checks the condition against the new row and
fails. The registry's production pointer records the epoch that wrote it, and a promote or
rollback with a lower epoch than the pointer's is refused under the pointer's lock (in a bucket:
checked on the pointer whose etag the conditional put then names,
:meth:`patchd.promotion.registry.Registry.promote`), so a stale leader cannot switch
production even between its store check and its pointer write. If Redis lost its epoch counter
(restarted without persistence) a newly elected leader finds the stored epoch ahead of its own;
it raises the counter above it (compare-and-set on its lease) before it claims.

Not fenced: side effects outside the store and the registry (RQ enqueues, hooks, webhooks) are
guarded by the local deadline only; a pause landing between a check and such a call can repeat a
job of the same run, never a second run record, candidate or promotion.

Without a lease (``leader.enabled: false``, or the default ``auto`` on the embedded SQLite store;
unit tests) :meth:`Leadership.solo` is used: always the leader, no Redis, no fencing. Only one
replica may then run; replicas sharing one SQLite file set ``enabled: true``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from patchd.exceptions import FencedError, NotLeaderError

if TYPE_CHECKING:
    from prometheus_client.registry import Collector
    from redis import Redis

    from patchd.config import Config
    from patchd.store.backend import Store

log = logging.getLogger(__name__)

EPOCH_KV_KEY = "leader:epoch"
SAFETY = 0.8  # this replica leads until sent + ttl * SAFETY of its last renewal
T = TypeVar("T")

# KEYS[1] lease, KEYS[2] epoch counter; ARGV[1] holder JSON without epoch, ARGV[2] ttl ms
_ACQUIRE = """
if redis.call('SET', KEYS[1], 'acquiring', 'NX', 'PX', ARGV[2]) then
  local epoch = redis.call('INCR', KEYS[2])
  local value = cjson.encode({id = ARGV[1], epoch = epoch, url = ARGV[3]})
  redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
  return value
end
return false
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# raise the counter past the store's epoch and re-stamp the lease (only by its holder)
_RAISE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
local current = tonumber(redis.call('GET', KEYS[2]) or '0')
local floor = tonumber(ARGV[2])
if current <= floor then redis.call('SET', KEYS[2], floor + 1) end
local epoch = redis.call('INCR', KEYS[2])
local holder = cjson.decode(ARGV[1])
local value = cjson.encode({id = holder.id, epoch = epoch, url = holder.url})
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
return value
"""


@dataclass(frozen=True)
class Holder:
    """Who holds the lease: identity, epoch, and the URL its API answers on."""

    identity: str
    epoch: int
    url: str | None
    raw: str  # the exact lease value (compare-and-set operand)

    @classmethod
    def parse(cls, raw: str | bytes) -> Holder | None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        try:
            data = json.loads(text)
            return cls(str(data["id"]), int(data["epoch"]), data.get("url") or None, text)
        except (ValueError, KeyError, TypeError):
            return None  # "acquiring" (inside the script) or foreign data


def replica_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class RedisLease:
    """The lease primitive in Redis (no threads, no local clock): see the module docstring."""

    def __init__(self, client: Redis, key: str, ttl_s: float) -> None:
        self.client = client
        self.key = key
        self.epoch_key = f"{key}:epoch"
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._raise = client.register_script(_RAISE)

    def acquire(self, identity: str, url: str | None) -> Holder | None:
        """The new holder (with its fresh epoch) when the lease was free, else None."""
        raw = self._acquire(
            keys=[self.key, self.epoch_key], args=[identity, self.ttl_ms, url or ""]
        )
        return Holder.parse(raw) if raw else None

    def renew(self, holder: Holder) -> bool:
        return bool(self._renew(keys=[self.key], args=[holder.raw, self.ttl_ms]))

    def release(self, holder: Holder) -> bool:
        return bool(self._release(keys=[self.key], args=[holder.raw]))

    def holder(self) -> Holder | None:
        raw = self.client.get(self.key)
        return Holder.parse(raw) if raw else None

    def raise_epoch(self, holder: Holder, floor: int) -> Holder | None:
        """A new epoch above ``floor`` for the lease ``holder`` still holds (None: lost)."""
        raw = self._raise(keys=[self.key, self.epoch_key], args=[holder.raw, floor, self.ttl_ms])
        return Holder.parse(raw) if raw else None


_FENCE_SQL = (
    "INSERT INTO kv (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
    "SET value = excluded.value, updated_at = excluded.updated_at "
    "WHERE CAST(kv.value AS INTEGER) <= CAST(excluded.value AS INTEGER)"
)


def stored_epoch(conn: Any) -> int:
    row = conn.execute("SELECT value FROM kv WHERE key = ?", (EPOCH_KV_KEY,)).fetchone()
    return int(row[0]) if row else 0


def fence(conn: Any, epoch: int, action: str) -> None:
    """Inside a write transaction: proceed only if the stored epoch is <= ``epoch`` (recording
    it); else FencedError (the transaction must roll back). Portable SQL (SQLite, Postgres)."""
    cur = conn.execute(_FENCE_SQL, (EPOCH_KV_KEY, str(epoch), time.time()))
    if cur.rowcount != 1:
        found = stored_epoch(conn)
        log.error(
            "fenced: %s refused: this replica's leader epoch %d is stale (the store has %d)",
            action,
            epoch,
            found,
        )
        raise FencedError(action, epoch, found)


class Leadership:
    """This replica's leadership: the renewal thread, the guard and the fence."""

    def __init__(
        self,
        lease: RedisLease | None,
        store: Store | None,
        *,
        identity: str | None = None,
        url: str | None = None,
        renew_interval_s: float = 1.0,
        ttl_s: float = 5.0,
    ) -> None:
        self.lease = lease
        self.store = store
        self.identity = identity or replica_identity()
        self.url = url
        self.renew_interval_s = renew_interval_s
        self.ttl_s = ttl_s
        self._holder: Holder | None = None  # ours, while leading
        self._seen: Holder | None = None  # the last holder we read (status, 503 bodies)
        self._deadline = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._elected: list[Callable[[], None]] = []
        self.terms = 0  # elections won by this replica

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def solo(cls) -> Leadership:
        """Always the leader; no Redis, no fencing (no lease configured, unit tests)."""
        return cls(None, None)

    @classmethod
    def from_config(cls, config: Config, redis_url: str, store: Store) -> Leadership:
        section = config.leader
        if not section.uses_lease(config.store.url):
            return cls.solo()
        import redis

        client = redis.Redis.from_url(
            redis_url, socket_timeout=section.ttl_s / 3, socket_connect_timeout=section.ttl_s / 3
        )
        key = section.key or f"{config.redis.queue_prefix}:leader"
        url = section.advertise_url or f"http://{config.api.host}:{config.api.port}"
        return cls(
            RedisLease(client, key, section.ttl_s),
            store,
            url=url,
            renew_interval_s=section.renew_interval_s or section.ttl_s / 3,
            ttl_s=section.ttl_s,
        )

    # -- state -----------------------------------------------------------------------------
    @property
    def solo_mode(self) -> bool:
        return self.lease is None

    @property
    def is_leader(self) -> bool:
        if self.lease is None:
            return True
        return self._holder is not None and time.monotonic() < self._deadline

    @property
    def epoch(self) -> int | None:
        """This replica's epoch while it leads (None: follower, or solo)."""
        holder = self._holder
        return holder.epoch if holder is not None and self.is_leader else None

    def leader_name(self) -> str:
        seen = self._holder if self.is_leader else self._seen
        if seen is None:
            return "none (no replica holds the lease)"
        return f"{seen.identity} at {seen.url}" if seen.url else seen.identity

    def status(self) -> dict[str, Any]:
        seen = self._holder if self.is_leader else self._seen
        return {
            "mode": "solo" if self.solo_mode else "redis-lease",
            "identity": self.identity,
            "role": "leader" if self.is_leader else "follower",
            "epoch": self.epoch,
            "leader": None if seen is None else seen.identity,
            "leader_url": None if seen is None else seen.url,
            "leader_epoch": None if seen is None else seen.epoch,
            "terms": self.terms,
        }

    # -- what components call --------------------------------------------------------------
    def require(self, action: str) -> None:
        """NotLeaderError (HTTP 503 naming the leader) unless this replica leads now."""
        if not self.is_leader:
            raise NotLeaderError(action, self.leader_name(), self._seen.url if self._seen else None)

    def fence(self, conn: Any, action: str) -> None:
        """Inside a store write transaction: require leadership and check/advance the epoch."""
        if self.lease is None:
            return
        self.require(action)
        holder = self._holder
        if holder is None:
            raise NotLeaderError(action, self.leader_name(), None)
        fence(conn, holder.epoch, action)

    def guard(self, job: Callable[[], T], name: str | None = None) -> Callable[[], T | None]:
        """``job`` that runs only while this replica leads (a follower skips it)."""
        label = str(name or getattr(job, "__qualname__", repr(job)))

        def guarded() -> T | None:
            if not self.is_leader:
                log.debug("%s skipped: this replica is a follower", label)
                return None
            try:
                return job()
            except NotLeaderError as err:
                log.warning("%s stopped: %s", label, err)
                return None

        guarded.__name__ = getattr(job, "__name__", "guarded")
        guarded.__qualname__ = label
        return guarded

    def on_elected(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` at the start of each term of this replica (takeover duties: fail
        runs a dead leader left half-created, reconcile the registry, restart the monitor)."""
        self._elected.append(callback)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Try once now (a single replica leads before the API answers), then keep trying."""
        if self.lease is None:
            self.terms = 1
            self._run_elected()
            return
        won = self._attempt()
        self._thread = threading.Thread(target=self._loop, name="patchd-leader", daemon=True)
        self._thread.start()
        if won:
            self._run_elected()

    def stop(self) -> None:
        """Stop acting, release the lease (another replica takes over at once). Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
            self._thread = None
        with self._lock:
            holder, self._holder = self._holder, None
        if holder is not None and self.lease is not None:
            try:
                self.lease.release(holder)
                log.info("leader lease released (epoch %d)", holder.epoch)
            except Exception as err:
                log.warning("leader lease not released (it expires after its ttl): %s", err)

    def _loop(self) -> None:
        while not self._stop.wait(self.renew_interval_s):
            won = self._attempt()
            if won:
                threading.Thread(
                    target=self._run_elected, name="patchd-leader-takeover", daemon=True
                ).start()

    def _attempt(self) -> bool:
        """Renew while leading, else try to acquire; True when a new term began."""
        assert self.lease is not None
        sent = time.monotonic()
        try:
            if self._holder is not None:
                if self.lease.renew(self._holder):
                    self._deadline = sent + self.ttl_s * SAFETY
                    return False
                self._demote("the lease was taken over (it expired before it was renewed)")
            holder = self.lease.acquire(self.identity, self.url)
            if holder is None:
                self._seen = self.lease.holder()
                return False
            holder = self._claim(holder)
            if holder is None:
                return False
            with self._lock:
                self._holder, self._seen = holder, holder
                self._deadline = sent + self.ttl_s * SAFETY
                self.terms += 1
            log.warning(
                "this replica (%s) is now the leader, epoch %d", self.identity, holder.epoch
            )
            return True
        except Exception as err:  # redis down, store busy: a follower, or a leader on borrowed time
            if self._holder is not None and time.monotonic() >= self._deadline:
                self._demote(f"the lease could not be renewed: {err}")
            else:
                log.debug("leader lease attempt failed: %s", err)
            return False

    def _claim(self, holder: Holder) -> Holder | None:
        """Record the new epoch in the store before any duty (fences the previous leader)."""
        assert self.lease is not None and self.store is not None
        for _ in range(3):
            with self.store.write() as conn:
                found = stored_epoch(conn)
                if found <= holder.epoch:
                    fence(conn, holder.epoch, "claim leadership")
                    return holder
            log.warning(
                "the store's leader epoch %d is ahead of Redis's %d (Redis lost its counter?): "
                "raising it",
                found,
                holder.epoch,
            )
            raised = self.lease.raise_epoch(holder, found)
            if raised is None:
                return None
            holder = raised
        return None

    def _demote(self, why: str) -> None:
        with self._lock:
            holder, self._holder = self._holder, None
        if holder is not None:
            log.warning("this replica is no longer the leader (epoch %d): %s", holder.epoch, why)

    def _run_elected(self) -> None:
        for callback in self._elected:
            if not self.is_leader:
                return
            try:
                callback()
            except NotLeaderError as err:
                log.warning("takeover duty stopped: %s", err)
                return
            except Exception:
                log.exception("takeover duty %r failed", callback)

    # -- metrics ---------------------------------------------------------------------------
    def collectors(self) -> Iterable[Collector]:
        return (_LeaderCollector(self),)


class _LeaderCollector:
    """``patchd_leader`` (1 on the leader) and ``patchd_leader_epoch`` (this term's epoch)."""

    def __init__(self, leadership: Leadership) -> None:
        self.leadership = leadership

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        lead = self.leadership
        gauge = GaugeMetricFamily(
            "patchd_leader", "1 on the replica that holds the leader lease", labels=["replica"]
        )
        gauge.add_metric([lead.identity], 1.0 if lead.is_leader else 0.0)
        yield gauge
        epoch = GaugeMetricFamily(
            "patchd_leader_epoch", "Fencing epoch of this replica's term (0: follower)"
        )
        epoch.add_metric([], float(lead.epoch or 0))
        yield epoch
        terms = CounterMetricFamily("patchd_leader_terms", "Elections won by this replica")
        terms.add_metric([], float(lead.terms))
        yield terms

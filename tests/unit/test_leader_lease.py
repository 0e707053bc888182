"""The leader lease on a real redis-server: acquire, renew, expiry, takeover, fencing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from patchd.exceptions import FencedError, NotLeaderError
from patchd.leader import Leadership, RedisLease, fence, stored_epoch
from patchd.store.backend import Store


def _lease(url: str, ttl: float = 0.6) -> RedisLease:
    return RedisLease(redis.Redis.from_url(url), "t:leader", ttl)


def test_acquire_renew_expire_takeover(clean_redis: str) -> None:
    a, b = _lease(clean_redis), _lease(clean_redis)
    held = a.acquire("a", "http://a")
    assert held is not None and held.epoch == 1
    assert b.acquire("b", None) is None  # NX: taken
    assert a.renew(held)
    time.sleep(0.8)  # past the ttl without renewing
    assert not a.renew(held)
    taken = b.acquire("b", None)
    assert taken is not None and taken.epoch == 2 and taken.identity == "b"
    assert not a.release(held)  # compare-and-set: not a's any more
    assert b.holder() == taken
    assert b.release(taken) and b.holder() is None


def test_stale_epoch_write_is_refused(any_store: Store) -> None:
    store = any_store
    with store.write() as conn:
        fence(conn, 3, "claim")
    with pytest.raises(FencedError), store.write() as conn:
        conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('x', '1', 0)")
        fence(conn, 2, "create run")
    with store.read() as conn:
        assert stored_epoch(conn) == 3
        assert conn.execute("SELECT count(*) FROM kv WHERE key = 'x'").fetchone()[0] == 0


def test_a_stale_write_waiting_on_the_new_leaders_claim_is_refused(
    any_store: Store, backend_store_config: dict[str, object], tmp_path: Path
) -> None:
    """Two replicas' stores on one database: the new leader claims epoch 3 and holds its
    transaction open; the ex-leader's epoch-2 write waits for it, then finds 3 and is refused."""
    from patchd.config import build_config
    from patchd.store.backend import open_store

    config = build_config({"state_dir": str(tmp_path), "store": backend_store_config})
    stale_store = open_store(config)
    with any_store.write() as conn:
        fence(conn, 2, "old term")
    claimed, outcome = threading.Event(), []

    def stale() -> None:
        claimed.wait(5)
        try:
            with stale_store.write() as conn:
                conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('run', '1', 0)")
                fence(conn, 2, "create run")
            outcome.append("written")
        except FencedError:
            outcome.append("fenced")

    thread = threading.Thread(target=stale)
    thread.start()
    try:
        with any_store.write() as conn:
            fence(conn, 3, "claim")
            claimed.set()
            time.sleep(0.3)  # the stale write is waiting on this transaction now
        thread.join(10)
        assert outcome == ["fenced"]
        with any_store.read() as conn:
            assert stored_epoch(conn) == 3
            assert conn.execute("SELECT count(*) FROM kv WHERE key = 'run'").fetchone()[0] == 0
    finally:
        stale_store.close()


def test_leadership_takeover_fences_the_old_leader(clean_redis: str, any_store: Store) -> None:
    store = any_store
    one = Leadership(_lease(clean_redis), store, renew_interval_s=0.1, ttl_s=0.6)
    two = Leadership(_lease(clean_redis), store, renew_interval_s=0.1, ttl_s=0.6)
    one.start()
    two.start()
    try:
        assert one.is_leader and not two.is_leader
        with pytest.raises(NotLeaderError, match="the leader is"):
            two.require("approve")
        old = one._holder
        one._stop.set()  # "paused": its thread stops renewing
        deadline = time.monotonic() + 5
        while not two.is_leader and time.monotonic() < deadline:
            time.sleep(0.05)
        assert two.is_leader and not one.is_leader
        assert old is not None and two.epoch == old.epoch + 1
        one._holder, one._deadline = old, time.monotonic() + 10  # as if it woke up believing
        with pytest.raises(FencedError), store.write() as conn:
            one.fence(conn, "create run")
    finally:
        one.stop()
        two.stop()


@pytest.mark.parametrize(
    ("enabled", "store", "lease"),
    [
        ("auto", {}, False),  # one serve on its SQLite file: no lease, monitors with Redis down
        ("auto", {"url": "postgresql://u@h/d"}, True),  # replicas share a Postgres store
        (True, {}, True),  # replicas sharing one SQLite file ask for it
        (False, {"url": "postgresql://u@h/d"}, False),
    ],
)
def test_the_lease_is_taken_where_replicas_can_share_a_store(
    enabled: object, store: dict[str, object], lease: bool
) -> None:
    from patchd.config import build_config

    config = build_config({"leader": {"enabled": enabled}, "store": store})
    assert config.leader.uses_lease(config.store.url) is lease
    assert (Leadership.from_config(config, "redis://127.0.0.1:1/0", None).lease is None) != lease  # type: ignore[arg-type]

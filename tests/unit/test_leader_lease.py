"""The leader lease on a real redis-server: acquire, renew, expiry, takeover, fencing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from patchd.exceptions import FencedError, NotLeaderError
from patchd.leader import Leadership, RedisLease, fence, stored_epoch
from patchd.store.db import Store


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


def test_stale_epoch_write_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "p.db")
    with store.write() as conn:
        fence(conn, 3, "claim")
    with pytest.raises(FencedError), store.write() as conn:
        conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('x', '1', 0)")
        fence(conn, 2, "create run")
    with store.read() as conn:
        assert stored_epoch(conn) == 3
        assert conn.execute("SELECT count(*) FROM kv WHERE key = 'x'").fetchone()[0] == 0
    store.close()


def test_leadership_takeover_fences_the_old_leader(clean_redis: str, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "p.db")
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
        store.close()

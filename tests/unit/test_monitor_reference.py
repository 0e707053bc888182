from __future__ import annotations

import numpy as np
import pytest

from patchd.exceptions import StoreError
from patchd.monitor import reference as refmod
from patchd.monitor.reference import CellReference, GroupProfile, Learning, Reference
from patchd.store.backend import Store


def sample() -> Reference:
    cells = (CellReference("a", "site=A", 100, 90), CellReference("*", "site=A", 150, 130))
    prof = (GroupProfile("site=A", 150, 1.0, (0.4, 0.6), (0.9, 0.8), (0.1, 0.2)),)
    return Reference("m", "window", 12.5, 99.0, cells, prof)


def test_json_round_trip_and_lookup() -> None:
    ref = sample()
    back = refmod.from_json(ref.to_json())
    assert back == ref
    assert back.cell("a", "site=A").accuracy == 0.9
    assert back.cell("b", "site=A") is None
    assert back.profile("site=A").mean_confidence == pytest.approx(0.85)
    assert refmod.from_json(Learning("m", 3.0).to_json()) == Learning("m", 3.0)


def test_lower_bound_is_one_sided_and_shrinks_with_n() -> None:
    small, big = CellReference("a", "g", 50, 45), CellReference("a", "g", 5000, 4500)
    assert small.lower_bound(0.99) < big.lower_bound(0.99) < 0.9
    assert CellReference("a", "g", 0, 0).lower_bound(0.99) == 0.0


def test_persisted_in_the_kv_table_under_a_versioned_key(any_store: Store) -> None:
    store = any_store  # SQLite, then Postgres
    with store.write() as conn:
        refmod.save(conn, sample())
    with store.read() as conn:
        assert refmod.load(conn, "m") == sample()
        assert refmod.load(conn, "other") is None
        raw = conn.execute("SELECT value FROM kv WHERE key = 'monitor:reference:m'").fetchone()[0]
    assert '"version": 1' in raw
    with store.write() as conn:
        conn.execute(
            "UPDATE kv SET value = ? WHERE key = ?", ('{"version": 99}', "monitor:reference:m")
        )
    with store.read() as conn, pytest.raises(StoreError, match="version 99"):
        refmod.load(conn, "m")


def test_reference_from_a_held_out_evaluation() -> None:
    evaluation = {
        "cells": [
            {"class_name": "a", "group_name": "site=A", "n": 40, "correct": 36},
            {"class_name": "b", "group_name": "site=A", "n": 0, "correct": 0},
        ]
    }
    ref = refmod.from_evaluation("m", evaluation, epoch_ts=5.0)
    assert ref is not None and ref.source == "evaluation" and ref.epoch_ts == 5.0
    assert ref.cell("a", "site=A").accuracy == 0.9 and ref.cell("b", "site=A") is None
    assert ref.cell("*", "site=A") == CellReference("*", "site=A", 40, 36)  # pooled from the cells
    assert refmod.from_evaluation("m", {"cells": [{"n": 1}]}, 0.0) is None
    assert refmod.from_evaluation("m", {}, 0.0) is None


def test_profiles_from_traffic_sample_with_a_fixed_seed() -> None:
    from patchd.monitor.window import Traffic

    rng = np.random.default_rng(0)
    n = 5000
    t = Traffic(rng.integers(0, 2, n), rng.random(n), np.zeros(n, np.int64), None, None)
    a = refmod.profiles_from(t, ["site=A", "site=B"], 2)
    assert [p.group for p in a] == ["site=A"]
    assert len(a[0].confidence) == refmod.PROFILE_SAMPLE
    assert a == refmod.profiles_from(t, ["site=A", "site=B"], 2)

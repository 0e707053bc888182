from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patchd.config import GroupsConfig
from patchd.monitor.cells import group_shares, window_stats
from patchd.monitor.groups import GroupSpace
from patchd.monitor.window import GroupIndex, LabeledEvents, Window
from patchd.stats import wilson_interval
from tests.unit.monitor_helpers import CLASSES

GROUPS = ["site=A", "site=B", "site=other"]


def events(
    label: list[int], pred: list[int], group: list[int], conf: list[float] | None = None
) -> LabeledEvents:  # noqa: E501
    n = len(label)
    ts = np.arange(n, dtype=np.float64)
    c = np.asarray(conf if conf is not None else [np.nan] * n, dtype=np.float64)
    i64 = np.int64
    return LabeledEvents(
        ts, ts.copy(), np.asarray(pred, i64), np.asarray(label, i64), c, np.asarray(group, i64)
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 2)), max_size=300))
def test_cells_match_a_direct_computation(rows: list[tuple[int, int, int]]) -> None:
    label, pred, group = (list(x) for x in zip(*rows, strict=True)) if rows else ([], [], [])
    ev = events(label, pred, group, [0.5 + 0.1 * (i % 5) for i in range(len(rows))])
    stats = window_stats(ev, CLASSES, GROUPS, n_min=3, confidence=0.95)
    y, p, g = np.asarray(label, int), np.asarray(pred, int), np.asarray(group, int)
    for cell in stats.cells:
        gi = GROUPS.index(cell.group)
        mask = (g == gi) if cell.cls == "*" else (g == gi) & (y == CLASSES.index(cell.cls))
        n, ok = int(mask.sum()), int((p[mask] == y[mask]).sum())
        assert (cell.n, cell.correct) == (n, ok)
        if n:
            assert cell.accuracy == pytest.approx(ok / n)
            assert (cell.ci_low, cell.ci_high) == pytest.approx(wilson_interval(ok, n, 0.95))
            assert cell.pred_mix == pytest.approx(tuple(np.bincount(p[mask], minlength=2) / n))
            assert cell.mean_confidence == pytest.approx(ev.confidence[mask].mean())
        else:
            assert np.isnan(cell.accuracy)
    qualified = [c for c in stats.cells if c.cls != "*" and c.n >= 3]
    expected = min((c.accuracy for c in qualified), default=None)
    assert stats.worst_group_accuracy == expected


def test_worst_group_ignores_small_cells_and_pooled_rows() -> None:
    # site=B|b: 2 events, both wrong (below n_min); site=A|a: 4 of 5 right
    ev = events(
        [0] * 5 + [1] * 2 + [1] * 5, [0, 0, 0, 0, 1] + [0, 0] + [1] * 5, [0] * 5 + [1] * 2 + [0] * 5
    )
    stats = window_stats(ev, CLASSES, GROUPS, n_min=5, confidence=0.95)
    assert stats.worst_group_accuracy == pytest.approx(0.8)
    assert stats.worst_cell == ("a", "site=A")


def test_group_shares_include_configured_groups_without_traffic() -> None:
    assert group_shares(np.array([0, 0, 0, 1]), GROUPS) == {
        "site=A": 0.75,
        "site=B": 0.25,
        "site=other": 0.0,
    }


def test_group_keys_beyond_the_configured_values_map_to_other() -> None:
    space = GroupSpace.from_config(
        GroupsConfig(attributes=["site", "cam"], values={"site": ["A", "B"]})
    )
    assert space.canonical("site=A,cam=7") == "site=A,cam=7"
    assert space.canonical("site=Z,cam=7") == "site=other,cam=7"
    assert space.canonical("cam=7,site=B") == "site=B,cam=7"
    assert space.canonical("site=unknown,cam=1") == "site=unknown,cam=1"
    assert space.known() == ()  # cam has no fixed value list: the set is open (ingest caps it)
    index = GroupIndex(
        GroupSpace.from_config(GroupsConfig(attributes=["site"], values={"site": ["A"]}))
    )
    codes = index.encode(np.array(["site=A", "site=x", "site=y", "site=A"], dtype=object))
    assert [index.names[c] for c in codes] == ["site=A", "site=other", "site=other", "site=A"]
    assert index.names == ["site=A", "site=other"]


def test_window_keeps_the_newest_events_by_count_and_age() -> None:
    w = Window(max_events=5)
    w.append(events([0] * 4, [0] * 4, [0] * 4), now=10)
    w.append(events([1] * 3, [1] * 3, [1] * 3), now=10)
    assert list(w.events.label) == [0, 0, 1, 1, 1]
    timed = Window(max_events=100, max_age_s=2.5)
    timed.append(events([0] * 6, [0] * 6, [0] * 6), now=5.0)  # labeled_at 0..5
    assert list(timed.events.labeled_at) == [3.0, 4.0, 5.0]

"""``patchd bench monitor``: detection delay, false alarms and tick time of the subgroup monitor.

Simulated stream (fixed seeds): 2 classes x 12 subgroups = 24 cells (+ 12 pooled rows), every
row tested on every tick. The affected subgroup holds 5% of traffic at accuracy 0.90; the other
cells' accuracies are drawn once in [0.80, 0.97]. Reference: the first ``reference_window``
labeled events. Measured:

- detection delay: labeled events *of the affected group* after the change until its first
  ``GroupDegraded``, for accuracy drops of 10, 20 and 40 points (``--reps`` seeds each);
- false alarms: ``GroupDegraded`` events over ``--stationary`` stationary events (ticks of 10k);
- tick time on windows of 10k, 100k and 1M events with 1,000 new events per tick: the accuracy
  pass (``ModelMonitor.advance``: cells, sequential tests) and the drift pass (evidently, 5k recent
  predictions) in memory; and the whole accuracy tick through the SQLite store (cold start reading
  the whole window, then a warm tick reading 1,000 new events).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import click
import numpy as np

from patchd.config import Config, build_config
from patchd.domain import GroupDegraded
from patchd.monitor.engine import ModelMonitor
from patchd.monitor.window import LabeledEvents, Traffic

N_GROUPS = 12
AFFECTED = 0
SHARE = 0.05
CLASSES = ["0", "1"]
GROUPS = [f"g=g{i:02d}" for i in range(N_GROUPS)]
MACHINE = "2-core x86_64, no GPU"


@dataclass(frozen=True)
class Stream:
    acc: np.ndarray  # [K, G]
    shares: np.ndarray  # [G]


def base_stream(seed: int) -> Stream:
    rng = np.random.default_rng(seed)
    acc = rng.uniform(0.80, 0.97, size=(2, N_GROUPS))
    acc[:, AFFECTED] = 0.90
    shares = np.full(N_GROUPS, (1 - SHARE) / (N_GROUPS - 1))
    shares[AFFECTED] = SHARE
    return Stream(acc, shares)


def draw(rng: np.random.Generator, s: Stream, n: int, t0: float) -> LabeledEvents:
    g = rng.choice(N_GROUPS, n, p=s.shares)
    y = rng.integers(0, 2, n)
    ok = rng.random(n) < s.acc[y, g]
    ts = t0 + np.arange(n) * 0.01
    conf = np.clip(rng.normal(0.85, 0.08, n), 0.5, 1.0)
    return LabeledEvents(ts, ts, np.where(ok, y, 1 - y), y, conf, g.astype(np.int64))


def bench_config(window: int, reference_window: int) -> Config:
    return build_config(
        {
            "model": {"name": "bench", "class_names": CLASSES},
            "groups": {"attributes": ["g"], "values": {"g": [g.split("=")[1] for g in GROUPS]}},
            "monitor": {"window": window, "reference_window": reference_window, "cooldown_s": 0},
        }
    )


def no_traffic() -> Traffic:
    z = np.zeros(0, np.int64)
    return Traffic(z, np.zeros(0), z, None, None)


def traffic_of(ev: LabeledEvents, n: int) -> Traffic:
    tail = ev.take(slice(max(0, len(ev) - n), None))
    return Traffic(tail.pred, tail.confidence, tail.group, None, None)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def next(self, n: int) -> float:
        t0, self.t = self.t, self.t + n * 0.01
        return t0


def feed(
    mon: ModelMonitor, rng: np.random.Generator, s: Stream, n: int, clock: Clock, tick: int
) -> list[GroupDegraded]:  # noqa: E501
    alarms: list[GroupDegraded] = []
    while n > 0:
        ev = draw(rng, s, min(tick, n), clock.next(min(tick, n)))
        n -= len(ev)
        _, events = mon.advance(ev, no_traffic(), clock.t)
        alarms += [e for e in events if isinstance(e, GroupDegraded)]
    return alarms


def detection_delay(
    drop: float, seed: int, reference_window: int, max_events: int = 400_000
) -> tuple[int | None, int]:  # noqa: E501
    """(affected-group events until the alarm or None, false alarms before the change)."""
    rng, clock = np.random.default_rng(seed), Clock()
    s = base_stream(seed)
    mon = ModelMonitor(bench_config(100_000, reference_window), "bench")
    false_alarms = len(feed(mon, rng, s, reference_window + 50_000, clock, 5000))
    bad = Stream(s.acc.copy(), s.shares)
    bad.acc[:, AFFECTED] -= drop
    seen = 0
    while seen < max_events * SHARE:
        ev = draw(rng, bad, 500, clock.next(500))
        _, events = mon.advance(ev, no_traffic(), clock.t)
        hits = [e for e in events if isinstance(e, GroupDegraded) and e.group == GROUPS[AFFECTED]]
        if hits:
            alarm_ts = _alarm_ts(mon, ev)
            return seen + int(
                ((ev.group == AFFECTED) & (ev.labeled_at <= alarm_ts)).sum()
            ), false_alarms  # noqa: E501
        seen += int((ev.group == AFFECTED).sum())
    return None, false_alarms


def _alarm_ts(mon: ModelMonitor, ev: LabeledEvents) -> float:
    since = [
        st.since
        for (cls, g), st in mon.policy.rows.items()
        if g == GROUPS[AFFECTED] and st.degraded
    ]
    return min(since) if since else float(ev.labeled_at[-1])


def false_alarms(n: int, seed: int, reference_window: int) -> tuple[int, int]:
    """(GroupDegraded events over n stationary events after the reference, rows tested)."""
    rng, clock = np.random.default_rng(seed), Clock()
    mon = ModelMonitor(bench_config(100_000, reference_window), "bench")
    s = base_stream(seed)
    feed(mon, rng, s, reference_window, clock, 10_000)
    alarms = feed(mon, rng, s, n, clock, 10_000)
    return len(alarms), len(mon.policy.rows)


def tick_time(window: int, seed: int = 0, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of (the accuracy pass, the drift pass) with 1,000 new events per tick."""
    rng, clock = np.random.default_rng(seed), Clock()
    s = base_stream(seed)
    mon = ModelMonitor(bench_config(window, 10_000), "bench")
    warm = draw(rng, s, window, clock.next(window))
    mon.advance(warm, traffic_of(warm, 5000), clock.t)
    mon.apply_drift(*mon.compute_drift())  # imports evidently once, outside the timing
    acc, drift = [], []
    for _ in range(repeats):
        ev = draw(rng, s, 1000, clock.next(1000))
        t0 = time.perf_counter()
        mon.advance(ev, traffic_of(mon.window.events, 5000), clock.t)
        t1 = time.perf_counter()
        mon.apply_drift(*mon.compute_drift())
        acc.append(t1 - t0)
        drift.append(time.perf_counter() - t1)
    return statistics.median(acc), statistics.median(drift)


def store_tick_time(window: int, seed: int = 0) -> tuple[float, float]:
    """(cold tick reading the whole window from SQLite, warm tick reading 1,000 new events)."""
    from patchd.store.db import Store

    rng, clock = np.random.default_rng(seed), Clock()
    s = base_stream(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "bench.db")
        _insert(store, draw(rng, s, window, clock.next(window)), "w")
        mon = ModelMonitor(bench_config(window, 10_000), "bench")
        t = time.perf_counter()
        mon.tick(store, now=clock.t)
        cold = time.perf_counter() - t
        _insert(store, draw(rng, s, 1000, clock.next(1000)), "n")
        t = time.perf_counter()
        mon.tick(store, now=clock.t)
        warm = time.perf_counter() - t
        store.close()
    return cold, warm


def _insert(store, ev: LabeledEvents, prefix: str) -> None:  # noqa: ANN001
    rows = [
        (
            "bench",
            f"{prefix}{i}",
            float(ev.ts[i]),
            int(ev.pred[i]),
            float(ev.confidence[i]),
            GROUPS[int(ev.group[i])],
            "{}",
            "bench",
            float(ev.ts[i]),
            int(ev.label[i]),
            float(ev.ts[i]),
        )
        for i in range(len(ev))
    ]
    with store.write() as conn:
        conn.executemany(
            "INSERT INTO predictions (model, id, ts, pred, confidence, group_key, groups, source, "
            "ingested_at, label, labeled_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )


@click.command("monitor")
@click.option("--reps", default=20, show_default=True, help="seeds per drop size")
@click.option("--stationary", default=1_000_000, show_default=True, help="stationary events")
@click.option("--reference-window", default=50_000, show_default=True)
@click.option("--store/--no-store", "with_store", default=True, help="also time ticks via SQLite")
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("benchmarks/results/monitor.json")
)
def monitor(reps: int, stationary: int, reference_window: int, with_store: bool, out: Path) -> None:
    """Detection delay, false alarms over a stationary stream, and tick time (fixed seeds)."""
    results: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": MACHINE,
        "python": platform.python_version(),
        "reference_window": reference_window,
        "groups": N_GROUPS,
        "affected_share": SHARE,
    }
    results["detection"] = [
        _detection_row(drop, reps, reference_window) for drop in (0.10, 0.20, 0.40)
    ]
    fa, rows = false_alarms(stationary, 1234, reference_window)
    results["false_alarms"] = {"events": stationary, "alarms": fa, "rows_tested_per_tick": rows}
    results["tick_seconds"] = {
        str(w): dict(zip(("accuracy", "drift"), tick_time(w), strict=True))
        for w in (10_000, 100_000, 1_000_000)
    }
    if with_store:
        results["store_tick_seconds"] = {
            str(w): dict(zip(("cold", "warm"), store_tick_time(w), strict=True))
            for w in (10_000, 100_000, 1_000_000)
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _print(results)


def _detection_row(drop: float, reps: int, reference_window: int) -> dict[str, object]:
    runs = [detection_delay(drop, 100 + r, reference_window) for r in range(reps)]
    delays = [d for d, _ in runs if d is not None]
    return {
        "drop": drop,
        "reps": reps,
        "detected": len(delays),
        "median": statistics.median(delays) if delays else None,
        "p90": float(np.percentile(delays, 90)) if delays else None,
        "max": max(delays) if delays else None,
        "false_alarms_before_change": sum(f for _, f in runs),
    }


def _n(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _print(r: dict) -> None:  # noqa: ANN001
    print(f"monitor bench, {r['date']}, {r['machine']}, reference {r['reference_window']} events\n")
    print("| drop | detected | median delay | p90 | max | false alarms before change |")
    print("|---|---|---|---|---|---|")
    for d in r["detection"]:
        print(
            f"| {d['drop']:.2f} | {d['detected']}/{d['reps']} | {_n(d['median'])} | "
            f"{_n(d['p90'])} | {d['max']} | {d['false_alarms_before_change']} |"
        )
    fa = r["false_alarms"]
    print(
        f"\nfalse alarms over {fa['events']:,} stationary events, "
        f"{fa['rows_tested_per_tick']} rows tested per tick: {fa['alarms']}\n"
    )
    print("| window | accuracy tick | drift pass | cold tick via store | warm tick via store |")
    print("|---|---|---|---|---|")
    store = r.get("store_tick_seconds", {})
    for w, t in r["tick_seconds"].items():
        st = store.get(w, {})
        print(
            f"| {int(w):,} | {t['accuracy']:.3f} s | {t['drift']:.3f} s | "
            f"{st.get('cold', float('nan')):.3f} s | "
            f"{st.get('warm', float('nan')):.3f} s |"
        )

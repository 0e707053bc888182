"""``patchd bench models``: one serve watching 10 models x 12 subgroups, 100k labeled events each.

Built in a temporary state directory: a ``models:`` config of ``--models`` models (2 classes, 12
values of one group attribute, ``monitor.window`` = ``--events``), and a SQLite store holding
``--events`` labeled events per model (the bench stream of :mod:`patchd.bench.stream`, recent
timestamps). Measured:

- the first monitor tick of every model after a restart (monitors that ran once, learning and
  saving their references, are replaced by fresh ones, which read the start of their windows
  from the store: ``monitor.catch_up_events_per_tick``), summed over the models, and each
  model's; then the ticks until every window is read in full;
- the steady-state tick of every model with 1,000 new labeled events per model (``--ticks``
  rounds, the median of the per-round sums);
- a real ``patchd serve`` on that state directory: the time from ``/readyz`` until every model's
  ``/v1/models/<model>/groups`` holds its whole window, and the serve process's RSS then (VmRSS)
  and at its peak (VmHWM).

The ticks run one model after another (serve runs them as separate scheduler jobs), so the sum
is what one core spends on a round of ticks.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
import yaml

from patchd.bench.stream import CLASSES, GROUPS, N_GROUPS, base_stream
from patchd.config import Config, build_config
from patchd.monitor.engine import ModelMonitor
from patchd.store.backend import Store, open_store

MACHINE = "2-core x86_64, no GPU"
NEW_PER_TICK = 1000


def bench_data(state_dir: Path, n_models: int, events: int) -> dict[str, Any]:
    """The raw config of the bench (also written as the serve's YAML)."""
    return {
        "state_dir": str(state_dir),
        "groups": {"attributes": ["g"], "values": {"g": [g.split("=")[1] for g in GROUPS]}},
        "monitor": {"window": events, "reference_window": 10_000, "cooldown_s": 0},
        "trigger": {"enabled": False},
        "models": [{"name": f"m{i:02d}", "class_names": CLASSES} for i in range(n_models)],
    }


def insert(store: Store, model: str, n: int, seed: int, prefix: str, t_end: float) -> None:
    """``n`` labeled events of the bench stream for ``model``, the newest at ``t_end``."""
    rng, stream = np.random.default_rng(seed), base_stream(seed)
    g = rng.choice(N_GROUPS, n, p=stream.shares)
    y = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < stream.acc[y, g], y, 1 - y)
    conf = np.clip(rng.normal(0.85, 0.08, n), 0.5, 1.0)
    ts = t_end - (n - np.arange(n)) * 1e-3
    rows = [
        (model, f"{prefix}{i}", float(ts[i]), int(pred[i]), float(conf[i]), GROUPS[int(g[i])])
        + (int(y[i]),)
        for i in range(n)
    ]
    with store.write() as conn:
        conn.executemany(
            "INSERT INTO predictions (model, id, ts, pred, confidence, group_key, groups, source, "
            "ingested_at, label, labeled_at) VALUES (?1,?2,?3,?4,?5,?6,'{}','bench',?3,?7,?3)",
            rows,
        )


def tick_all(config: Config, store: Store, monitors: dict[str, ModelMonitor]) -> dict[str, float]:
    """One tick of every model (seconds each)."""
    out = {}
    for view in config.per_model():
        name = view.model.name
        t = time.perf_counter()
        monitors[name].tick(store)
        out[name] = time.perf_counter() - t
    return out


def in_process(config: Config, ticks: int) -> dict[str, Any]:
    store = open_store(config)
    try:
        # a first serve: learns and saves each model's reference, then is "restarted"
        monitors = {v.model.name: ModelMonitor(v, v.model.name) for v in config.per_model()}
        while any(m.snapshot is None or m.catch_up is not None for m in monitors.values()):
            tick_all(config, store, monitors)
        monitors = {v.model.name: ModelMonitor(v, v.model.name) for v in config.per_model()}
        first = tick_all(config, store, monitors)
        catch_up = [sum(first.values())]
        while any(m.catch_up is not None for m in monitors.values()):
            catch_up.append(sum(tick_all(config, store, monitors).values()))
        steady = []
        for r in range(ticks):
            for i, name in enumerate(monitors):
                insert(store, name, NEW_PER_TICK, 1000 + 100 * r + i, f"t{r}-", time.time())
            steady.append(sum(tick_all(config, store, monitors).values()))
        n = {name: m.snapshot.n if m.snapshot else 0 for name, m in monitors.items()}
    finally:
        store.close()
    return {
        "first_tick_s": sum(first.values()),
        "first_tick_per_model_s": first,
        # ticks (all models) until every window is read, and their sum
        "catch_up_ticks": len(catch_up),
        "catch_up_s": sum(catch_up),
        "steady_tick_s": statistics.median(steady),
        "steady_tick_rounds_s": steady,
        "window_n": n,
    }


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def served(data: dict[str, Any], tmp: Path, names: list[str], events: int) -> dict[str, Any]:
    """Start a real serve on the state directory; readiness, first full windows, RSS."""
    import httpx

    port, token = _port(), "bench-token-0123456789abcdef"
    cfg = {**data, "api": {"port": port}, "redis": {"embedded": "always"}}
    path = tmp / "patchd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATCHD_TOKEN": token}
    log = (tmp / "serve.log").open("wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "patchd", "serve", "-c", str(path)], stdout=log, stderr=log, env=env
    )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
    try:
        _wait(lambda: httpx.get(url + "/readyz", timeout=2).status_code == 200, proc, 120)
        ready_s = time.monotonic() - started
        t = time.monotonic()

        def full() -> bool:
            return all(
                httpx.get(f"{url}/v1/models/{m}/groups", headers=headers, timeout=10).json()["n"]
                >= events
                for m in names
            )

        _wait(full, proc, 300)
        windows_s = time.monotonic() - t
        rss, peak = _rss_mib(proc.pid)
        time.sleep(12)  # one more round of ticks (monitor.interval_s is 10 s)
        rss_later, peak_later = _rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    return {
        "ready_s": ready_s,
        "all_windows_full_s": windows_s,
        "rss_mib": rss,
        "peak_rss_mib": peak,
        "rss_mib_after_a_tick_round": rss_later,
        "peak_rss_mib_after_a_tick_round": peak_later,
    }


def _wait(check: Any, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"patchd serve exited {proc.returncode} (see its log)")
        try:
            if check():
                return True
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    raise click.ClickException(f"patchd serve: not there after {timeout:.0f}s")


@click.command("models")
@click.option("--models", "n_models", default=10, show_default=True, help="models in one serve")
@click.option("--events", default=100_000, show_default=True, help="labeled events per model")
@click.option("--ticks", default=5, show_default=True, help="steady-state tick rounds")
@click.option("--serve/--no-serve", "with_serve", default=True, help="also measure a real serve")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("benchmarks/results/models.json"),
    show_default=True,
)
def models(n_models: int, events: int, ticks: int, with_serve: bool, out: Path) -> None:
    """Monitor tick of N models in one serve, and serve's RSS."""
    with tempfile.TemporaryDirectory(prefix="patchd-bench-models-") as tmp_name:
        tmp = Path(tmp_name)
        data = bench_data(tmp / "state", n_models, events)
        config = build_config(data)
        config.state_dir.mkdir(parents=True)
        names = list(config.model_names)
        store = open_store(config)
        t = time.perf_counter()
        for i, name in enumerate(names):
            insert(store, name, events, i, "e", time.time())
        store.close()
        fill_s = time.perf_counter() - t
        results: dict[str, Any] = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": MACHINE,
            "python": platform.python_version(),
            "models": n_models,
            "groups": N_GROUPS,
            "events_per_model": events,
            "fill_s": fill_s,
            **in_process(config, ticks),
        }
        if with_serve:
            results["serve"] = served(data, tmp, names, events)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    _print(results)


def _print(r: dict[str, Any]) -> None:
    s = r.get("serve", {})
    print(
        f"models bench, {r['date']}, {r['machine']}: {r['models']} models x {r['groups']} groups, "
        f"{r['events_per_model']:,} labeled events each\n"
    )
    print(
        "| first tick, all models | ticks until windows full | steady tick, all models "
        "| serve: windows full | RSS |"
    )
    print("|---|---|---|---|---|")
    rss = f"{s['rss_mib']:.0f} MiB (peak {s['peak_rss_mib']:.0f})" if s else "-"
    full = f"{s['all_windows_full_s']:.1f} s" if s else "-"
    print(
        f"| {r['first_tick_s']:.2f} s | {r['catch_up_ticks']} ({r['catch_up_s']:.2f} s) "
        f"| {r['steady_tick_s']:.2f} s | {full} | {rss} |"
    )

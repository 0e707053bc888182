"""``patchd bench ingest``: sustained ingest throughput of a real ``patchd serve`` process.

1. Batched HTTP: ``--events`` prediction events in JSON-array batches of ``--batch``, sent by
   ``--concurrency`` client threads. A request returns after its batch committed, so events/s is
   durable throughput; request latency p50/p99 is per batch.
2. JSONL tailing: the same number of events in one file, moved into the tailed directory at
   once; events/s until the tailer's committed count reaches it.
3. serve's peak RSS (psutil, sampled every 100 ms), and RSS with ``--events`` rows stored.
4. Late labels, on the store the phases above filled (``2 x --events`` rows), two ways:
   *few pending*: before each joining batch, :data:`FEW_PENDING` labels arrive for ids of that
   batch (fewer labels wait than the batch holds); *backlog*: :data:`LATE_BACKLOG` labels for ids
   that have no prediction yet wait in ``pending_labels``, and each joining batch attaches
   :data:`LATE_BATCH` of them. Joining batches alternate with plain ones of the same size
   (:data:`LATE_BATCH` events, nothing to join); p50 commit latency of each, and the ratio of the
   slower joining kind to plain (target: within 2x).

Each of ``--repeat`` runs starts a fresh serve on an empty store; the table shows the median run
and the JSON keeps every run. ``--store postgres`` puts the store in PostgreSQL: a private server
(initdb + pg_ctl in a temp dir, production durability: fsync and synchronous_commit on) or the
one ``--store-url`` names, a fresh database per run. ``--replicas N`` (Postgres only) then also
times the batched HTTP phase against N serve replicas on one database, the client threads spread
over them, beside one replica in the same run: the scale-out ratio. Writes
``benchmarks/results/ingest.json`` (``ingest-postgres.json``) and prints a markdown table row.
The client runs on the same machine and competes with serve for the CPU; the load average is
recorded alongside, and events per serve CPU-second are reported as a load-independent figure.
"""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from itertools import count
from pathlib import Path
from statistics import median
from urllib.parse import urlsplit, urlunsplit

import click
import httpx
import orjson
import yaml

TOKEN = "bench-token-0123456789abcdef0123"
TARGET_EVENTS_PER_S = 100_000
TARGET_RSS_MIB = 300
SMALL_REQUESTS, SMALL_BATCH = 300, 100  # the latency phase: 100-event requests
LATE_BATCHES, LATE_BATCH = 20, 1000  # the late-label phase: joining and plain batches, each
FEW_PENDING = 25  # labels waiting before each few-pending joining batch (< LATE_BATCH)
LATE_BACKLOG = 200_000  # labels waiting for their predictions in the backlog phase
TARGET_JOIN_RATIO = 2.0  # joining batches within 2x the latency of plain ones
TARGET_POSTGRES_EVENTS_PER_S = 80_000  # per replica, batched HTTP, issue 16
TARGET_REPLICA_SCALING = 1.6  # N replicas on one Postgres against one


@dataclass(frozen=True)
class IngestBench:
    date: str
    machine: str
    load_avg_1m_before: float
    events: int
    batch: int
    concurrency: int
    repeats: int  # the figures below are the median over the runs
    http_events_per_s: float
    http_events_per_serve_cpu_s: float  # events per CPU-second serve used (load-independent)
    http_p50_ms: float
    http_p99_ms: float
    small_batch_p50_ms: float  # 100-event requests, one at a time
    small_batch_p99_ms: float
    tail_events_per_s: float
    tail_events_per_serve_cpu_s: float
    rss_after_http_mib: float
    rss_peak_mib: float
    stored: int
    pending_labels_per_s: float  # labels stored as pending (no prediction yet)
    plain_batch_p50_ms: float  # LATE_BATCH new predictions, nothing to join
    few_pending_batch_p50_ms: float  # LATE_BATCH new predictions, FEW_PENDING of them joining
    backlog_batch_p50_ms: float  # LATE_BATCH predictions joining, LATE_BACKLOG labels waiting
    join_ratio: float  # the slower joining p50 / the plain p50
    targets_met: dict[str, bool]
    runs: list[dict[str, float]]  # per run: both rates, serve CPU rates, RSS
    store: str = "sqlite"  # "sqlite" or "postgres"
    replicas: int = 1
    replica_events_per_s: dict[str, float] | None = None  # HTTP events/s by replica count


def machine() -> str:
    gpu = "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()}, {gpu}"


def _event(i: int, prefix: str) -> dict[str, object]:
    return {
        "id": f"{prefix}{i}",
        "ts": 1795428000.0 + i * 0.001,
        "model": "model",
        "pred": i & 1,
        "probs": [0.25, 0.75] if i & 1 else [0.75, 0.25],
        "groups": {"site": "ABCD"[i & 3]},
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop_event = threading.Event()

    def current(self) -> int:
        return int(self.process.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def run(self) -> None:
        while not self.stop_event.wait(0.1):
            try:
                self.peak = max(self.peak, self.current())
            except Exception:
                return


def start_serve(
    workdir: Path, port: int, *, store_url: str | None = None, name: str = "serve"
) -> subprocess.Popen[bytes]:
    """A serve process on ``port``; the tailed directory only for the first of several."""
    config: dict[str, object] = {
        "state_dir": str(workdir / f"state-{name}"),
        "model": {"name": "model"},
        "groups": {"attributes": ["site"]},
        "redis": {"embedded": "never"},
        "api": {"port": port, "max_body_bytes": 64 << 20},
        "monitor": {"interval_s": 3600},
        "leader": {"key": f"patchd-bench-leader-{os.getpid()}-{port}"},
    }
    if store_url is not None:
        config["store"] = {"url": store_url}
    if name == "serve":
        config["sources"] = {
            "allowed_roots": [str(workdir / "logs")],
            "tail": [{"glob": str(workdir / "logs" / "*.jsonl"), "poll_interval_s": 0.05}],
        }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process
    exe = str(Path(sys.executable).with_name("patchd"))
    proc = subprocess.Popen([exe, "serve", "-c", str(path)], stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"serve exited; see {workdir / f'{name}.log'}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise click.ClickException("serve did not become ready")


def run_http(
    url: str | list[str], events: int, batch: int, concurrency: int
) -> tuple[float, list[float]]:
    """Send ``events`` in batches; client thread ``i`` posts to ``urls[i % len(urls)]``."""
    urls = [url] if isinstance(url, str) else url
    bodies = [
        orjson.dumps([_event(i, "h") for i in range(start, min(start + batch, events))])
        for start in range(0, events, batch)
    ]
    latencies: list[float] = []
    lock = threading.Lock()
    next_body = iter(range(len(bodies)))

    def worker(base_url: str) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        with httpx.Client(base_url=base_url, headers=headers, timeout=300) as client:
            while True:
                with lock:
                    index = next(next_body, None)
                if index is None:
                    return
                t0 = time.perf_counter()
                r = client.post("/v1/predictions", content=bodies[index])
                if r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "1")))
                    r = client.post("/v1/predictions", content=bodies[index])
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t0)

    threads = [
        threading.Thread(target=worker, args=(urls[i % len(urls)],)) for i in range(concurrency)
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return events / (time.perf_counter() - start), latencies


def run_small_batches(
    url: str, requests: int = SMALL_REQUESTS, size: int = SMALL_BATCH
) -> list[float]:
    """Sequential requests of ``size`` events on an otherwise idle serve: a plugin's view."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for r in range(requests):
            body = orjson.dumps([_event(r * size + i, "s") for i in range(size)])
            t0 = time.perf_counter()
            client.post("/v1/predictions", content=body).raise_for_status()
            latencies.append(time.perf_counter() - t0)
    return latencies


def jsonl_count(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith('patchd_predictions_ingested_total{source="jsonl"}'):
            return float(line.split()[-1])
    return 0.0


def run_tail(url: str, workdir: Path, events: int) -> float:
    staging = workdir / "logs" / "staging.tmp"
    with open(staging, "wb") as fh:
        for start in range(0, events, 10_000):
            chunk = range(start, min(start + 10_000, events))
            fh.write(b"".join(orjson.dumps(_event(i, "t")) + b"\n" for i in chunk))
    t0 = time.perf_counter()
    os.rename(staging, workdir / "logs" / "bench.jsonl")
    while jsonl_count(url) < events:
        time.sleep(0.1)
    return events / (time.perf_counter() - t0)


@dataclass(frozen=True)
class LateLabels:
    pending_rate: float  # backlog labels stored per second
    plain: list[float]  # seconds per batch
    few: list[float]
    backlog: list[float]
    joined: int


class _LateClient:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.joined = 0

    def labels(self, prefix: str, ids: range) -> None:
        labels = [{"id": f"{prefix}{i}", "label": i & 1} for i in ids]
        self.client.post("/v1/labels", content=orjson.dumps(labels)).raise_for_status()

    def timed_batch(self, prefix: str, start: int, times: list[float]) -> None:
        body = orjson.dumps([_event(i, prefix) for i in range(start, start + LATE_BATCH)])
        t0 = time.perf_counter()
        r = self.client.post("/v1/predictions", content=body)
        times.append(time.perf_counter() - t0)
        r.raise_for_status()
        self.joined += int(r.json()["joined"])


def run_late_labels(url: str) -> LateLabels:
    """Few-pending and backlog joining batches, each alternating with a plain batch."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    plain: list[float] = []
    few: list[float] = []
    backlog: list[float] = []
    with httpx.Client(base_url=url, headers=headers, timeout=300) as client:
        late = _LateClient(client)
        for b in range(LATE_BATCHES):
            start = b * LATE_BATCH
            late.labels("few", range(start, start + FEW_PENDING))
            late.timed_batch("few", start, few)
            late.timed_batch("plain", start, plain)
        t0 = time.perf_counter()
        for start in range(0, LATE_BACKLOG, 10_000):
            late.labels("late", range(start, start + 10_000))
        pending_rate = LATE_BACKLOG / (time.perf_counter() - t0)
        for b in range(LATE_BATCHES):
            start = b * LATE_BATCH
            late.timed_batch("late", start, backlog)
            late.timed_batch("plain", (LATE_BATCHES + b) * LATE_BATCH, plain)
    return LateLabels(pending_rate, plain, few, backlog, late.joined)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@click.command()
@click.option("--events", type=click.IntRange(1000), default=1_000_000, show_default=True)
@click.option("--batch", type=click.IntRange(1), default=10_000, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option(
    "--repeat", type=click.IntRange(1, 20), default=3, show_default=True,
    help="Runs, each with a fresh serve and store; the median is reported.",
)  # fmt: skip
@click.option(
    "--store", "store_kind", type=click.Choice(["sqlite", "postgres"]), default="sqlite",
    show_default=True, help="The store serve writes to.",
)  # fmt: skip
@click.option(
    "--store-url", default=None, metavar="URL",
    help="With --store postgres: a server to use (needs CREATEDB; a database per run is created "
    "and dropped) instead of a private one.",
)  # fmt: skip
@click.option(
    "--replicas", type=click.IntRange(1, 8), default=1, show_default=True,
    help="With --store postgres and N > 1: also time batched HTTP against N replicas on one "
    "database, beside one replica.",
)  # fmt: skip
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Results JSON  [default: benchmarks/results/ingest.json, ingest-postgres.json]",
)
def ingest(
    events: int,
    batch: int,
    concurrency: int,
    repeat: int,
    store_kind: str,
    store_url: str | None,
    replicas: int,
    out: Path | None,
) -> None:
    """Batched HTTP and JSONL tail throughput, p99 request latency, serve's peak RSS."""
    if store_kind != "postgres" and (store_url or replicas > 1):
        raise click.UsageError("--store-url and --replicas need --store postgres")
    out = out or Path(
        f"benchmarks/results/ingest{'' if store_kind == 'sqlite' else '-postgres'}.json"
    )
    load = os.getloadavg()[0]
    runs = []
    scaling = None
    with tempfile.TemporaryDirectory(prefix="patchd-bench-") as tmp, _databases(
        store_kind, store_url, Path(tmp)
    ) as new_database:  # fmt: skip
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(prefix="patchd-bench-run-") as run_dir:
                runs.append(_measure(Path(run_dir), events, batch, concurrency, new_database()))
        if replicas > 1:
            scaling = _measure_replicas(events, batch, concurrency, replicas, new_database)
    result = _result(load, events, batch, concurrency, runs, store_kind, scaling)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2) + b"\n")
    _print(result, out)


@contextmanager
def _databases(
    store_kind: str, store_url: str | None, workdir: Path
) -> Iterator[Callable[[], str | None]]:
    """A factory of fresh, empty stores: ``None`` (SQLite in the run's dir) or a Postgres URL."""
    if store_kind == "sqlite":
        yield lambda: None
        return
    if store_url is not None:
        with _ServerDatabases(store_url) as server:
            yield server.create
        return
    from patchd.store.pg_local import PrivatePostgres

    names = (f"bench{k}" for k in count())
    with PrivatePostgres(workdir / "postgres", durable=True) as server:
        yield lambda: server.create_database(next(names))


class _ServerDatabases:
    """Databases created on the server ``url`` names, dropped again on exit."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.created: list[str] = []

    def create(self) -> str:
        import psycopg

        name = f"patchd_bench_{os.getpid()}_{len(self.created)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return urlunsplit(urlsplit(self.url)._replace(path=f"/{name}"))

    def __enter__(self) -> _ServerDatabases:
        return self

    def __exit__(self, *exc: object) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _measure_replicas(
    events: int, batch: int, concurrency: int, replicas: int, new_database: Callable[[], str | None]
) -> dict[str, float]:
    """Batched HTTP events/s against 1 and ``replicas`` serves on one fresh database each."""
    rates: dict[str, float] = {}
    for n in (1, replicas):
        with tempfile.TemporaryDirectory(prefix="patchd-bench-replicas-") as tmp:
            url = new_database()
            ports = [_free_port() for _ in range(n)]
            procs = [
                start_serve(Path(tmp), port, store_url=url, name=f"replica{i}")
                for i, port in enumerate(ports)
            ]
            try:
                urls = [f"http://127.0.0.1:{port}" for port in ports]
                rates[str(n)], _ = run_http(urls, events, batch, concurrency * n)
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                for proc in procs:
                    proc.wait(120)
        rates[str(n)] = round(rates[str(n)])
    return rates


@dataclass(frozen=True)
class _Measured:
    http_rate: float
    latencies: list[float]
    tail_rate: float
    rss_after_http: int
    rss_peak: int
    stored: int
    small_latencies: list[float]
    http_cpu_s: float  # CPU seconds serve used during each phase
    tail_cpu_s: float
    late: LateLabels


def _measure(
    workdir: Path, events: int, batch: int, concurrency: int, store_url: str | None
) -> _Measured:
    (workdir / "logs").mkdir()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(workdir, port, store_url=store_url)
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        cpu0 = sampler.cpu_seconds()
        http_rate, latencies = run_http(url, events, batch, concurrency)
        cpu1 = sampler.cpu_seconds()
        rss_after_http = sampler.current()
        small = run_small_batches(url)
        cpu_tail_start = sampler.cpu_seconds()
        tail_rate = run_tail(url, workdir, events)
        cpu2 = sampler.cpu_seconds()
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            stored = c.get(url + "/v1/status", timeout=60).json()["store"]["predictions"]
        late = run_late_labels(url)
    finally:
        sampler.stop_event.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    return _Measured(
        http_rate, latencies, tail_rate, rss_after_http, sampler.peak, stored, small,
        cpu1 - cpu0, cpu2 - cpu_tail_start, late,
    )  # fmt: skip


def _median_run(runs: list[_Measured]) -> _Measured:
    """The run with the median HTTP rate (its latencies and RSS belong to the same run)."""
    ordered = sorted(runs, key=lambda m: m.http_rate)
    return ordered[(len(ordered) - 1) // 2]


def _per_cpu_s(events: int, cpu_seconds: float) -> float:
    return round(events / max(cpu_seconds, 1e-9))


def _run_summary(events: int, m: _Measured) -> dict[str, float]:
    mib = 1 << 20
    return {
        "http_events_per_s": round(m.http_rate),
        "tail_events_per_s": round(m.tail_rate),
        "http_events_per_serve_cpu_s": _per_cpu_s(events, m.http_cpu_s),
        "tail_events_per_serve_cpu_s": _per_cpu_s(events, m.tail_cpu_s),
        "rss_peak_mib": round(max(m.rss_peak, m.rss_after_http) / mib, 1),
        "join_ratio": round(_join_ratio(m.late), 2),
        "labels_joined": m.late.joined,
    }


def _join_ratio(late: LateLabels) -> float:
    slower = max(percentile(late.few, 0.5), percentile(late.backlog, 0.5))
    return slower / max(percentile(late.plain, 0.5), 1e-9)


def _result(
    load: float,
    events: int,
    batch: int,
    concurrency: int,
    runs: list[_Measured],
    store_kind: str = "sqlite",
    scaling: dict[str, float] | None = None,
) -> IngestBench:
    mib = 1 << 20
    target = TARGET_EVENTS_PER_S if store_kind == "sqlite" else TARGET_POSTGRES_EVENTS_PER_S
    m = _median_run(runs)
    tail_rate = median(r.tail_rate for r in runs)
    peak = max(max(r.rss_peak, r.rss_after_http) for r in runs) / mib
    return IngestBench(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        load_avg_1m_before=round(load, 2),
        events=events,
        batch=batch,
        concurrency=concurrency,
        repeats=len(runs),
        http_events_per_s=round(m.http_rate),
        http_events_per_serve_cpu_s=_per_cpu_s(events, m.http_cpu_s),
        http_p50_ms=round(percentile(m.latencies, 0.50) * 1000, 1),
        http_p99_ms=round(percentile(m.latencies, 0.99) * 1000, 1),
        small_batch_p50_ms=round(percentile(m.small_latencies, 0.50) * 1000, 1),
        small_batch_p99_ms=round(percentile(m.small_latencies, 0.99) * 1000, 1),
        tail_events_per_s=round(tail_rate),
        tail_events_per_serve_cpu_s=median(_per_cpu_s(events, r.tail_cpu_s) for r in runs),
        rss_after_http_mib=round(m.rss_after_http / mib, 1),
        rss_peak_mib=round(peak, 1),
        stored=m.stored,
        pending_labels_per_s=round(m.late.pending_rate),
        plain_batch_p50_ms=round(percentile(m.late.plain, 0.5) * 1000, 1),
        few_pending_batch_p50_ms=round(percentile(m.late.few, 0.5) * 1000, 1),
        backlog_batch_p50_ms=round(percentile(m.late.backlog, 0.5) * 1000, 1),
        join_ratio=round(_join_ratio(m.late), 2),
        targets_met={
            "http_events_per_s": m.http_rate >= target,
            "tail_events_per_s": tail_rate >= target,
            "rss_mib": peak < TARGET_RSS_MIB,
            "join_within_2x": _join_ratio(m.late) <= TARGET_JOIN_RATIO,
            **(
                {}
                if scaling is None
                else {"replica_scaling": _scaling(scaling) >= TARGET_REPLICA_SCALING}
            ),
        },
        runs=[_run_summary(events, r) for r in runs],
        store=store_kind,
        replicas=max(map(int, scaling)) if scaling else 1,
        replica_events_per_s=scaling,
    )


def _scaling_target(scaling: dict[str, float] | None) -> dict[str, bool]:
    return (
        {} if scaling is None else {"replica_scaling": _scaling(scaling) >= TARGET_REPLICA_SCALING}
    )


def _scaling(rates: dict[str, float]) -> float:
    """Events/s of the most replicas over one replica's."""
    most = max(rates, key=int)
    return rates[most] / max(rates["1"], 1e-9)


def _print(r: IngestBench, out: Path) -> None:
    click.echo(f"store: {r.store}")
    click.echo("| date | machine | events | HTTP events/s (batch) | p50 / p99 request ms "
               "| tail events/s | serve RSS after 1M / peak MiB |")  # fmt: skip
    click.echo("|---|---|---|---|---|---|---|")
    click.echo(
        f"| {r.date} | {r.machine}, load {r.load_avg_1m_before} | {r.events:,} "
        f"| {r.http_events_per_s:,.0f} ({r.batch:,}) | {r.http_p50_ms} / {r.http_p99_ms} "
        f"| {r.tail_events_per_s:,.0f} | {r.rss_after_http_mib} / {r.rss_peak_mib} |"
    )
    http = sorted(run["http_events_per_s"] for run in r.runs)
    tail = sorted(run["tail_events_per_s"] for run in r.runs)
    click.echo(
        f"median of {r.repeats} runs; range HTTP {http[0]:,.0f}-{http[-1]:,.0f}, "
        f"tail {tail[0]:,.0f}-{tail[-1]:,.0f} events/s"
    )
    missed = [k for k, ok in r.targets_met.items() if not ok]
    click.echo(f"targets missed: {', '.join(missed)}" if missed else "all targets met")
    click.echo(
        f"events per CPU-second used by serve (independent of other load): "
        f"HTTP {r.http_events_per_serve_cpu_s:,.0f}, tail {r.tail_events_per_serve_cpu_s:,.0f}"
    )
    click.echo(
        f"100-event requests one at a time: p50 {r.small_batch_p50_ms} ms, "
        f"p99 {r.small_batch_p99_ms} ms"
    )
    click.echo(
        f"late labels at {r.stored:,} stored rows, {LATE_BATCH:,}-event batches, p50: plain "
        f"{r.plain_batch_p50_ms} ms; {FEW_PENDING} joining {r.few_pending_batch_p50_ms} ms; all "
        f"joining with {LATE_BACKLOG:,} labels waiting {r.backlog_batch_p50_ms} ms "
        f"(ratio {r.join_ratio}, target <= {TARGET_JOIN_RATIO}); backlog labels stored at "
        f"{r.pending_labels_per_s:,.0f}/s"
    )
    if r.replica_events_per_s:
        rates = ", ".join(f"{n} replica(s) {v:,.0f}" for n, v in r.replica_events_per_s.items())
        click.echo(
            f"batched HTTP on one Postgres: {rates} events/s "
            f"(x{_scaling(r.replica_events_per_s):.2f}, target >= {TARGET_REPLICA_SCALING})"
        )
    click.echo(f"results: {out}")

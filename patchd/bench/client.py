"""``patchd bench client``: the in-process client's cost on the model server's request path.

Measures every ``PatchdLogger.log()`` call (``perf_counter_ns`` around the call; the timer's own
cost is measured and reported as ``timer``) at a paced rate, in three phases:

- ``up``: a real ``patchd serve`` (started here in a temp dir, or ``--url``) receives the events;
  after the phase the logger is flushed and the delivered count is checked;
- ``down``: the logger points at a closed port: the sender retries with backoff while the
  queue grows; ``down_full``: the same with ``max_queue=1000``, so nearly every call takes the
  drop-and-count path (it must stay as fast);
- ``memory``: with patchd down, ``3 x max_queue`` events are logged under ``tracemalloc``: the
  peak is bounded by the queue, whatever the number of calls.

Prints one markdown row per phase and writes ``benchmarks/results/client.json``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

from patchd.plugins.serving.client import PatchdLogger

RESULTS = Path("benchmarks/results/client.json")


@dataclass(frozen=True)
class Phase:
    phase: str
    calls: int
    rate_per_s: float
    p50_us: float
    p99_us: float
    p999_us: float
    max_us: float
    timer_p99_us: float
    dropped: int
    delivered: int
    peak_mib: float | None = None
    rss_mib: float | None = None


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def _event(i: int) -> dict[str, object]:
    return {"id": f"bench-{i}", "pred": i & 1, "probs": [0.25, 0.75], "groups": {"site": "A"}}


def timed_calls(
    logger: PatchdLogger, n: int, rate: float, offset: int = 0
) -> tuple[list[int], list[int]]:
    """``n`` paced ``log()`` calls (bursts of 100); returns (call ns, empty-timer ns)."""
    clock = time.perf_counter_ns
    calls, timer = [0] * n, [0] * n
    burst, period = 100, 100 / rate
    start = time.perf_counter()
    for i in range(n):
        event = _event(offset + i)
        t0 = clock()
        logger.log(event)
        t1 = clock()
        calls[i] = t1 - t0
        t2 = clock()
        timer[i] = clock() - t2
        if i % burst == burst - 1:
            wait = start + (i + 1) // burst * period - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
    return sorted(calls), sorted(timer)


def measure(name: str, logger: PatchdLogger, n: int, rate: float, offset: int) -> Phase:
    calls, timer = timed_calls(logger, n, rate, offset)
    stats = logger.stats()
    return Phase(
        name,
        n,
        rate,
        _percentile(calls, 0.5),
        _percentile(calls, 0.99),
        _percentile(calls, 0.999),
        calls[-1] / 1000.0,
        _percentile(timer, 0.99),
        stats.dropped_full,
        stats.sent,
    )


def memory_phase(url: str, max_queue: int) -> Phase:
    """Log 3 x max_queue events at patchd-down under tracemalloc; the peak stays bounded."""
    tracemalloc.start()
    logger = PatchdLogger(url, max_queue=max_queue, backoff_s=0.05, max_backoff_s=0.5)
    n = 3 * max_queue
    started = time.perf_counter()
    for i in range(n):
        logger.log(_event(i))
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    stats = logger.stats()
    logger.close(timeout=0.5)
    return Phase(
        "memory",
        n,
        n / elapsed,
        0,
        0,
        0,
        0,
        0,
        stats.dropped_full,
        stats.sent,
        peak / (1 << 20),
        _rss_mib(),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(workdir: Path, token: str) -> tuple[subprocess.Popen[bytes], str]:
    """A real ``patchd serve`` with a private embedded Redis, in ``workdir``."""
    port = _free_port()
    config = workdir / "patchd.yaml"
    config.write_text(
        json.dumps(
            {
                "state_dir": str(workdir / "state"),
                "api": {"port": port},
                "redis": {"url": f"redis://127.0.0.1:{_free_port()}/0", "embedded": "auto"},
                "groups": {"attributes": ["site"]},
            }
        )
    )
    patchd = str(Path(sys.executable).with_name("patchd"))
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [patchd, "serve", "-c", str(config)],
        stdout=log,
        stderr=log,
        env={**os.environ, "PATCHD_TOKEN": token},
    )
    url = f"http://127.0.0.1:{port}"
    _wait_ready(proc, url, workdir / "serve.log")
    return proc, url


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"patchd serve exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise click.ClickException("patchd serve did not become ready in 60 s")


def run_phases(url: str, token: str, n: int, rate: float, max_queue: int) -> list[Phase]:
    up = PatchdLogger(url, token=token, max_queue=max_queue)
    phases = [measure("up", up, n, rate, 0)]
    up.flush(60)
    up.close()
    phases[0] = Phase(**{**asdict(phases[0]), "delivered": up.stats().sent})
    down = PatchdLogger(f"http://127.0.0.1:{_free_port()}", max_queue=max_queue)
    phases.append(measure("down", down, n, rate, n))
    down.close(timeout=0.5)
    # down with a small queue: nearly every call takes the drop-and-count path
    full = PatchdLogger(f"http://127.0.0.1:{_free_port()}", max_queue=1000)
    phases.append(measure("down_full", full, n, rate, 2 * n))
    full.close(timeout=0.5)
    phases.append(memory_phase(f"http://127.0.0.1:{_free_port()}", max_queue))
    return phases


def report(phases: list[Phase], out: Path) -> None:
    machine = f"{os.cpu_count()}-core {platform.machine()}, no GPU"
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": date,
                "machine": machine,
                "python": platform.python_version(),
                "phases": [asdict(p) for p in phases],
            },
            indent=2,
        )
        + "\n"
    )
    print(
        "| date | machine | phase | calls | rate/s | log() p50 µs | p99 µs | p99.9 µs | max µs "
        "| timer p99 µs | dropped | delivered | tracemalloc peak MiB | RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in phases:
        peak = f"{p.peak_mib:.1f}" if p.peak_mib is not None else "-"
        rss = f"{p.rss_mib:.0f}" if p.rss_mib is not None else "-"
        print(
            f"| {date} | {machine} | {p.phase} | {p.calls} | {p.rate_per_s:.0f} | {p.p50_us:.2f} "
            f"| {p.p99_us:.2f} | {p.p999_us:.2f} | {p.max_us:.1f} | {p.timer_p99_us:.2f} "
            f"| {p.dropped} | {p.delivered} | {peak} | {rss} |"
        )


@click.command("client")
@click.option("--calls", default=50_000, show_default=True, help="log() calls per phase")
@click.option("--rate", default=5_000.0, show_default=True, help="calls per second (paced)")
@click.option("--max-queue", default=100_000, show_default=True, help="PatchdLogger.max_queue")
@click.option("--url", default=None, help="a running patchd serve (default: start one here)")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def client(calls: int, rate: float, max_queue: int, url: str | None, out: Path) -> None:
    """Per-call cost of PatchdLogger.log() with patchd up and down, and its memory bound."""
    token = os.environ.get("PATCHD_TOKEN") or "bench-" + os.urandom(8).hex()
    with tempfile.TemporaryDirectory(prefix="patchd-bench-client-") as tmp:
        proc = None
        if url is None:
            proc, url = start_serve(Path(tmp), token)
        try:
            phases = run_phases(url, token, calls, rate, max_queue)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    report(phases, out)

"""A real Prometheus (Debian package) scrapes a real `patchd serve` with the shipped scrape config
and rules; patchd's metrics arrive, and an alert fires when a subgroup degrades.

What the test changes in the shipped files, and nothing else: each scrape job's target address
(serve's and Prometheus' own free loopback ports), and the intervals (15 s -> 1 s) so the test
takes seconds. The rule file is the shipped one, byte for byte.

`for:` durations: the alert this test drives, PatchdSubgroupDegraded, ships without `for:`
because patchd's monitor already debounces the state (sequential test, hysteresis, cooldown), so
it fires on the first rule evaluation that sees the degraded state, here and in production.
The alerts with a `for:` (15 m, 30 m, 10 m, 2 m) are exercised, firing and not firing, by the
promtool unit tests in test_deploy_rules.py, which run on a simulated clock.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.test_deploy_config import dashboard_queries, load_dashboards
from tests.integration.test_deploy_rules import ROOT, load_catalog
from tests.procs import ServeProcess, start_serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "digits"
SHIPPED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
SHIPPED_RULES = ROOT / "deploy" / "monitoring" / "rules" / "patchd.rules.yml"
INTERVAL = "1s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prometheus_binary() -> str:
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(found).exists():
        pytest.fail("prometheus is missing: `make setup` installs the Debian package `prometheus`")
    return found


def rewritten_config(serve_addr: str, prom_addr: str) -> dict[str, Any]:
    """The shipped prometheus.yml with only target addresses and intervals rewritten."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["global"]["scrape_interval"] = INTERVAL
    config["global"]["evaluation_interval"] = INTERVAL
    targets = {"patchd": serve_addr, "prometheus": prom_addr}
    for job in config["scrape_configs"]:
        if "scrape_interval" in job:
            job["scrape_interval"] = INTERVAL
        if "scrape_timeout" in job:
            job["scrape_timeout"] = INTERVAL
        for static in job["static_configs"]:
            static["targets"] = [targets[job["job_name"]]]
    return config


class Prometheus:
    def __init__(self, tmp_path: Path, serve_addr: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir = tmp_path / "prometheus"
        (workdir / "rules").mkdir(parents=True)
        shutil.copy(SHIPPED_RULES, workdir / "rules" / SHIPPED_RULES.name)
        config = rewritten_config(serve_addr, f"127.0.0.1:{self.port}")
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [_prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}",
                 f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=log,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        body = response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait_until(self, what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"prometheus exited {self.proc.returncode}:\n{self.log()}")
            try:
                found = check()
            except httpx.HTTPError:
                found = None
            if found:
                return found
            time.sleep(0.25)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\nprometheus log:\n{self.log()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[ServeProcess]:
    """One serve for the module's tests (starting one costs ~10 s on a busy 2-core box), with a
    fast monitor: ticks every 0.3 s, small cells count, short alarm horizon. Its own Redis database
    (15) on the session's private redis-server, so no other test's queues are touched."""
    overrides = {
        "redis": {"url": redis_url.rsplit("/", 1)[0] + "/15", "embedded": "never"},
        "model": {"name": MODEL, "class_names": ["zero", "one"]},
        "groups": {"attributes": ["color"], "values": {"color": ["red", "green"]}},
        "monitor": {"interval_s": 0.3, "n_min": 10, "window": 1000, "horizon_events": 1000},
        "trigger": {"enabled": False},  # no patch run: this test is about the alert path
    }
    proc = start_serve(tmp_path_factory.mktemp("deploy-serve"), overrides)
    yield proc
    proc.stop()


@pytest.fixture
def prometheus(tmp_path: Path, serve: ServeProcess) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path, serve.url.removeprefix("http://"))
    prom.wait_until("prometheus ready", lambda: httpx.get(prom.url + "/-/ready").status_code == 200)
    yield prom
    prom.stop()


def _events(n: int, failing: tuple[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, int]]]:
    """n labeled events over 2 classes x 2 colours; the model is wrong on every `failing` one."""
    preds, labels = [], []
    for i in range(n):
        label, color = i % 2, ("red", "green")[(i // 2) % 2]
        wrong = (("zero", "one")[label], color) == failing
        preds.append({"id": f"e-{i}", "ts": "2026-11-23T10:00:00Z", "model": MODEL,
                      "pred": 1 - label if wrong else label,
                      "probs": [0.3, 0.7] if (1 - label if wrong else label) else [0.7, 0.3],
                      "groups": {"color": color}})  # fmt: skip
        labels.append({"id": f"e-{i}", "label": label})
    return preds, labels


def _scraped_names(prom: Prometheus) -> set[str]:
    return set(prom.api("label/__name__/values", **{"match[]": '{job="patchd"}'}))


def _firing(prom: Prometheus, alertname: str) -> list[dict[str, Any]]:
    alerts = prom.api("alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


def _declared_families(metrics_text: str) -> set[str]:
    return {line.split()[2] for line in metrics_text.splitlines() if line.startswith("# TYPE ")}


def test_serve_exports_every_listed_metric(serve: ServeProcess) -> None:
    """Every metric of deploy/monitoring/metrics.txt is on serve's /metrics (the owner column
    says which part implements a missing one)."""
    declared = _declared_families(httpx.get(serve.url + "/metrics", timeout=10).text)
    missing = [
        f"{m.name} ({m.owner})" for m in load_catalog().load_metrics() if m.name not in declared
    ]
    assert not missing, f"serve does not export: {', '.join(missing)}"


def test_prometheus_scrapes_patchd_and_fires_on_degraded_subgroup(
    serve: ServeProcess, prometheus: Prometheus
) -> None:
    _scraped_and_quiet(serve, prometheus)
    preds, labels = _events(800, failing=("one", "red"))  # the model fails one cell only
    with serve.client() as client:
        for path, body in (("/v1/predictions", preds), ("/v1/labels", labels)):
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            assert response.json()["rejected"] == []
    alerts = prometheus.wait_until(
        "PatchdSubgroupDegraded firing", lambda: _firing(prometheus, "PatchdSubgroupDegraded")
    )
    cells = {(a["labels"]["class"], a["labels"]["group"]) for a in alerts}
    assert ("one", "color=red") in cells
    assert not {c for c in cells if c[1] == "color=green"}, cells  # healthy cells stay quiet
    alert = next(a for a in alerts if a["labels"]["class"] == "one")
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["model"] == MODEL
    assert alert["annotations"]["runbook_url"] == "README.md#runbook-patchdsubgroupdegraded"
    assert alert["annotations"]["summary"].endswith("on class one, group color=red")
    _numbers_as_prometheus_sees_them(prometheus)
    _rules_are_healthy(prometheus)
    _dashboard_queries_run(prometheus)


def _scraped_and_quiet(serve: ServeProcess, prom: Prometheus) -> None:
    """Before any data: the scrape works, every listed series that serve exports with a sample
    is in Prometheus, and the degraded/down alerts stay silent over a few evaluations."""
    up = prom.wait_until("a scrape of job patchd", lambda: prom.query('up{job="patchd"} == 1'))
    assert up[0]["metric"]["instance"] == serve.url.removeprefix("http://")
    text = httpx.get(serve.url + "/metrics", timeout=10).text
    with_samples = {ln.split("{")[0].split()[0] for ln in text.splitlines() if ln[:1].isalnum()}
    catalog = load_catalog()
    expected = {n for m in catalog.load_metrics() for n in m.series_names()} & with_samples
    assert {"patchd_build_info", "patchd_alert_state", "patchd_candidates"} <= expected
    prom.wait_until("patchd's series in Prometheus", lambda: expected <= _scraped_names(prom))
    time.sleep(2)
    assert not _firing(prom, "PatchdSubgroupDegraded")
    assert not _firing(prom, "PatchdDaemonDown")


def _numbers_as_prometheus_sees_them(prom: Prometheus) -> None:
    ingested = prom.query('sum(patchd_predictions_ingested_total{job="patchd"})')
    assert float(ingested[0]["value"][1]) == 800
    worst = prom.query(f'patchd_worst_group_accuracy_ratio{{model="{MODEL}"}}')
    assert float(worst[0]["value"][1]) == 0.0
    # the worst-group alert (`for: 15m`) is pending: its sample guard let the cell through
    alerts = prom.api("alerts")["alerts"]
    states = [
        a["state"] for a in alerts if a["labels"]["alertname"] == "PatchdWorstGroupAccuracyLow"
    ]
    assert states == ["pending"]


def _rules_are_healthy(prom: Prometheus) -> None:
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    names = {r["name"] for r in rules}
    shipped = {r["alert"] for r in load_catalog().alert_rules(load_catalog().load_rules())}
    assert names == shipped
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad


def _dashboard_queries_run(prom: Prometheus) -> None:
    """Every dashboard query parses and runs in the real Prometheus (Grafana's variables set)."""
    values = {"$model": MODEL, "$class": ".*", "$__rate_interval": "1m", "$__range": "5m"}
    for dash in load_dashboards():
        for where, expr in dashboard_queries(dash):
            for var, value in values.items():
                expr = expr.replace(var, value)
            response = httpx.get(f"{prom.url}/api/v1/query", params={"query": expr}, timeout=5)
            assert response.status_code == 200, f"{where}: {expr}\n{response.text}"
    accuracy = prom.query(f'patchd_group_accuracy_ratio{{model="{MODEL}",class=~".*"}}')
    assert accuracy, "the subgroup dashboard's main query returns nothing"

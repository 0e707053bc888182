"""Runs the demo: start the parts, replay production traffic, patch, approve, recover."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from patchd.demo.plan import DemoPlan
from patchd.demo.pool import ProductionPool
from patchd.demo.processes import Children, patchd_argv, wait_http
from patchd.demo.stream import LiveAccuracy, Stream
from patchd.demo.workspace import Workspace, prepare
from patchd.exceptions import PatchdError

TABLE_EVERY_S = 3.0


@dataclass(frozen=True)
class DemoResult:
    run_id: str
    candidate_id: str
    monitor_worst_before: float | None
    monitor_worst_after: float | None
    live_worst_before: float | None
    live_worst_after: float | None
    seconds: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, plan: DemoPlan, approve: bool, console: Console) -> None:
        self.plan, self.approve, self.console = plan, approve, console
        self.port, self.server_port = free_port(), free_port()
        self.patchd_url = f"http://127.0.0.1:{self.port}"
        self.server_url = f"http://127.0.0.1:{self.server_port}"
        self.started = time.monotonic()
        self.last_table = 0.0
        self.live: Live | None = None  # the table being updated in place during a replay

    # ------------------------------------------------------------------ orchestration
    def run(self) -> DemoResult:
        self.say(f"[bold]patchd demo[/] ({self.plan.dataset}) in {self.plan.root}")
        ws = prepare(self.plan, self.port)
        self.show_base(ws)
        env = {**os.environ, "PATCHD_TOKEN": ws.token, "PYTHONUNBUFFERED": "1"}
        children = Children(self.plan.root / "logs", env)
        try:
            self.start_parts(children)
            return self.loop(ws, children)
        finally:
            self.end_live()
            self.say("stopping serve, worker and model server ...")
            children.stop_all()

    def start_parts(self, children: Children) -> None:
        config = str(self.plan.config_path)
        children.start("serve", patchd_argv("serve", "-c", config))
        wait_http(self.patchd_url + "/readyz", lambda r: r.status_code == 200, children)
        children.start("worker", patchd_argv("worker", "-c", config))
        children.start(
            "model-server",
            [
                sys.executable,
                "-m",
                "patchd.demo.model_server",
                "-c",
                config,
                "--port",
                str(self.server_port),
                "--patchd-url",
                self.patchd_url,
            ],
        )
        wait_http(self.server_url + "/health", lambda r: r.status_code == 200, children)
        self.say(
            f"serve {self.patchd_url} (metrics at /metrics), model server {self.server_url}, "
            f"logs in {children.log_dir}"
        )

    def loop(self, ws: Workspace, children: Children) -> DemoResult:
        api = httpx.Client(
            base_url=self.patchd_url, timeout=30, headers={"Authorization": f"Bearer {ws.token}"}
        )
        stream = Stream(
            self.server_url,
            self.patchd_url,
            ws.token,
            self.plan.images_dir,
            self.plan.label_delay_s,
            self.plan.rate_per_s,
        )
        try:
            live_before = self.replay_until_triggered(ws, stream, api, children)
            worst_before = self.monitor_worst(api)
            run = self.wait_run(api, children)
            candidate = self.wait_candidate(api, run["id"], children)
            self.promote(api, candidate, children)
            self.wait_reload(candidate["digest"], children)
            live_after = self.replay_after(ws, stream, api, children)
            worst_after = self.monitor_worst(api)
        finally:
            stream.close()
            api.close()
        return DemoResult(
            run["id"],
            candidate["id"],
            worst_before,
            worst_after,
            live_before.worst(),
            live_after.worst(),
            time.monotonic() - self.started,
        )

    # ------------------------------------------------------------------ phases
    def replay_until_triggered(
        self, ws: Workspace, stream: Stream, api: httpx.Client, children: Children
    ) -> LiveAccuracy:
        live = LiveAccuracy()
        self.say(
            f"[bold]1. stationary traffic[/]: {self.plan.stationary_events} predictions, "
            f"{self.plan.minority_before:.0%} minority colour"
        )
        self.replay(
            stream,
            ws.before,
            self.plan.minority_before,
            "a",
            live,
            api,
            children,
            self.plan.stationary_events,
        )
        if self.open_run(api) is not None:
            raise PatchdError("a patch run was triggered during stationary traffic (false alarm)")
        self.say(
            f"[bold]2. the mix shifts[/]: {self.plan.minority_after:.0%} minority colour; "
            "waiting for the monitor to flag the failing subgroup"
        )
        triggered = self.replay(
            stream,
            ws.before,
            self.plan.minority_after,
            "b",
            live,
            api,
            children,
            self.plan.shift_events_max,
            until_run=True,
        )
        if not triggered:
            raise PatchdError("the monitor did not trigger a patch run; see `patchd status`")
        self.table(api, force=True)
        return live

    def replay_after(
        self, ws: Workspace, stream: Stream, api: httpx.Client, children: Children
    ) -> LiveAccuracy:
        live = LiveAccuracy()
        self.say(
            f"[bold]5. traffic continues[/] on the patched model: "
            f"{self.plan.after_events} predictions"
        )
        self.replay(
            stream,
            ws.after,
            self.plan.minority_after,
            "c",
            live,
            api,
            children,
            self.plan.after_events,
        )
        time.sleep(2.5)  # two monitor ticks
        self.table(api, force=True)
        return live

    def replay(
        self,
        stream: Stream,
        pool: ProductionPool,
        share: float,
        phase: str,
        live: LiveAccuracy,
        api: httpx.Client,
        children: Children,
        events: int,
        until_run: bool = False,
    ) -> bool:
        """Send up to ``events`` predictions; with ``until_run`` stop once a patch run is open
        (True then). Labels still in flight are flushed before returning."""
        opened = False
        for i in range(events):
            live.add(stream.send(pool, share, phase))
            self.maybe_table(api, children)
            if until_run and i % 20 == 0 and self.open_run(api) is not None:
                opened = True
                break
        stream.flush_labels(force=True)
        return opened

    def wait_run(self, api: httpx.Client, children: Children) -> dict[str, Any]:
        run = self.open_run(api)
        if run is None:
            raise PatchdError("no patch run is open")
        self.say(f"[bold]3. patch run[/] {run['id']}: {run.get('reason', '')}")
        last = ""
        deadline = time.monotonic() + self.plan.timeout_s
        while time.monotonic() < deadline:
            children.check()
            run = api.get(f"/v1/runs/{run['id']}").json()
            line = f"   stage {run.get('stage')}: {run.get('state')} {run.get('progress', '')}"
            if line != last:
                self.say(line)
                last = line
            if run["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(1.0)
        if run["state"] != "succeeded":
            raise PatchdError(f"patch run {run['id']} ended {run['state']}: {run.get('error')}")
        if run.get("outcome") == "no_improvement":
            raise PatchdError(f"patch run {run['id']}: {run.get('outcome_message')}")
        return run

    def wait_candidate(self, api: httpx.Client, run_id: str, children: Children) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            children.check()
            for cand in api.get("/v1/candidates").json().get("candidates", []):
                if cand["run_id"] == run_id and cand["state"] != "evaluating":
                    self.show_candidate(api, cand)
                    return cand
            time.sleep(0.5)
        raise PatchdError(f"no candidate appeared for run {run_id}")

    def promote(self, api: httpx.Client, cand: dict[str, Any], children: Children) -> None:
        if cand["state"] != "awaiting_approval":
            raise PatchdError(
                f"candidate {cand['id']} is {cand['state']}: the gate did not pass it"
            )
        if self.approve:
            self.say(f"[bold]4. approving[/] {cand['id']} (--approve)")
            api.post(
                f"/v1/candidates/{cand['id']}/approve", json={"digest": cand["digest"]}
            ).raise_for_status()
            return
        self.say(
            f"[bold]4. waiting for approval[/]: in another terminal run\n"
            f"   patchd approve {cand['id']} -c {self.plan.config_path}"
        )
        while True:
            children.check()
            state = api.get(f"/v1/candidates/{cand['id']}").json()["state"]
            if state == "promoted":
                return
            if state in ("rejected", "expired"):
                raise PatchdError(f"candidate {cand['id']} was {state}")
            time.sleep(1.0)

    def wait_reload(self, digest: str, children: Children) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children.check()
            health = httpx.get(self.server_url + "/health", timeout=5).json()
            if health.get("sha256") == digest:
                self.say(f"   model server reloaded {digest[:12]}")
                return
            time.sleep(0.3)
        raise PatchdError("the model server did not reload the promoted model within 60 s")

    # ------------------------------------------------------------------ reading serve
    def open_run(self, api: httpx.Client) -> dict[str, Any] | None:
        runs = api.get("/v1/runs").json().get("runs", [])
        return runs[0] if runs else None

    def monitor_worst(self, api: httpx.Client) -> float | None:
        groups = api.get("/v1/groups").json()
        return groups.get("worst_group_accuracy")

    def maybe_table(self, api: httpx.Client, children: Children) -> None:
        if time.monotonic() - self.last_table >= TABLE_EVERY_S:
            children.check()
            self.table(api)

    def table(self, api: httpx.Client, force: bool = False) -> None:
        """Update the live table in place; ``force`` (a phase ended) leaves it printed as is."""
        self.last_table = time.monotonic()
        groups = api.get("/v1/groups").json()
        table = Table(
            title=f"live per-group accuracy (monitor window, n={groups.get('n', 0)})",
            title_justify="left",
        )
        for col in ("class", "group", "n", "accuracy", "95% interval", "state"):
            table.add_column(col)
        for c in groups.get("cells", []):
            if c["n"] == 0:
                continue
            acc = "-" if c["accuracy"] is None else f"{c['accuracy']:.2f}"
            ci = "-" if c["ci_low"] is None else f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}]"
            style = {"degraded": "red", "warning": "yellow"}.get(c["state"], "")
            table.add_row(
                str(c["class"]),
                c["group"],
                str(c["n"]),
                acc,
                ci,
                f"[{style}]{c['state']}[/]" if style else c["state"],
            )
        if self.live is None:
            self.live = Live(table, console=self.console, refresh_per_second=2)
            self.live.start()
        else:
            self.live.update(table, refresh=True)
        if force:
            self.end_live()

    def end_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    # ------------------------------------------------------------------ output
    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        self.console.print(f"[dim]{elapsed:6.1f}s[/] {text}")

    def show_base(self, ws: Workspace) -> None:
        cells = ", ".join(f"{k} {v:.2f}" for k, v in ws.base_eval.items())
        self.say(f"base model (plain ERM, colour shortcut) on held-out test: {cells}")

    def show_candidate(self, api: httpx.Client, cand: dict[str, Any]) -> None:
        gate = cand.get("gate") or {}
        self.say(
            f"candidate {cand['id']} digest {cand['digest'][:12]}: gate "
            f"[bold]{cand.get('verdict')}[/], state {cand.get('state')}"
        )
        for reason in gate.get("reasons", []):
            self.say(f"   {reason}")
        report = api.get(f"/v1/candidates/{cand['id']}/report", params={"format": "json"}).json()
        table = Table(
            title="held-out accuracy per group, incumbent → candidate", title_justify="left"
        )
        for col in ("class", "group", "n", "incumbent", "candidate", "delta"):
            table.add_column(col)
        for r in report.get("rows", []):
            table.add_row(
                r["cls"],
                r["group"],
                str(r["n"]),
                fmt(r["incumbent"]),
                fmt(r["candidate"]),
                "-" if r["delta"] is None else f"{r['delta']:+.2f}",
            )
        self.console.print(table)
        path = self.plan.state_dir / "registry" / cand["model"] / "versions" / cand["digest"]
        self.say(f"report: {path / 'report.html'}")


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary(result: DemoResult, plan: DemoPlan, console: Console) -> None:
    console.print(
        f"\n[bold]summary[/] ({result.seconds:.0f}s)\n"
        f"  worst-group accuracy on live traffic, monitor: {fmt(result.monitor_worst_before)} → "
        f"{fmt(result.monitor_worst_after)}; demo tally: {fmt(result.live_worst_before)} → "
        f"{fmt(result.live_worst_after)}\n"
        f"  run {result.run_id}, candidate {result.candidate_id}\n"
        f"  report: `patchd report {result.candidate_id} -c {plan.config_path}`\n"
        f"  metrics: the /metrics endpoint of serve; dashboards: deploy/grafana/dashboards/\n"
        f"  rerun: the base model and registry in {plan.root} are reused"
    )


def run_demo(plan: DemoPlan, approve: bool, console: Console | None = None) -> DemoResult:
    """Run the demo; the result is also written to ``<root>/result.json``."""
    console = console or Console()
    result = Demo(plan, approve, console).run()
    summary(result, plan, console)
    tmp = plan.root / "result.json.tmp"
    tmp.write_text(json.dumps(asdict(result), indent=2) + "\n")
    tmp.replace(plan.root / "result.json")
    return result


def default_root() -> Path:
    return Path(".patchd-demo").resolve()

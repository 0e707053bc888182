"""The decision and run commands against a real ``patchd serve``, as a person types them.

- ``-c`` is accepted after a ``runs`` subcommand (``patchd runs show RUN -c patchd.yaml``);
- ``patchd approve`` on a candidate that is not awaiting approval refuses before asking;
- ``patchd rollback`` asks for confirmation (``--yes`` skips it) and rolls back what it showed;
- ``patchd runs`` prints whole run ids at 80 columns and the elapsed time of an open run;
- decisions record the person (``--by``, the OS user, the UI's name field) with the token's name.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from patchd.promotion.audit import AuditLog
from patchd.promotion.registry import Registry
from tests.gate_support import failing, fake_run, passing, write_weights
from tests.procs import PATCHD, TOKEN, ServeProcess, start_serve, write_config
from tests.ui_support import APPROVER_TOKEN, csrf_of, start_ui_serve

pytestmark = pytest.mark.integration


def _cli(
    cfg: Path, *args: str, stdin: str = "", config_last: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATCHD_TOKEN": TOKEN, "COLUMNS": "80"}
    argv = [PATCHD, *args, "-c", str(cfg)] if config_last else [PATCHD, *args]
    return subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture
def serve(tmp_path: Path, clean_redis: str) -> Iterator[tuple[ServeProcess, Path]]:
    cfg = write_config(
        tmp_path,
        {
            "redis": {"url": clean_redis, "embedded": "never"},
            "model": {"name": "m"},
            "trigger": {"enabled": False},
            "data": {"use_production_slice": False},
        },
    )
    incumbent = tmp_path / "incumbent.safetensors"
    write_weights(incumbent, 100.0)
    done = _cli(cfg, "registry", "import", "--weights", str(incumbent))
    assert done.returncode == 0, done.stderr
    proc = start_serve(tmp_path, {}, config_path=cfg)
    yield proc, cfg
    proc.stop()


def test_approve_refuses_a_failed_candidate_before_asking(serve) -> None:
    proc, cfg = serve
    fake_run(proc.state_dir / "artifacts", "r0", failing(), 0.5)
    with proc.client() as admin:
        assert admin.post("/v1/candidates", json={"run_id": "r0"}).json()["state"] == "fail"
    audit = AuditLog(proc.state_dir / "audit.log")
    before = len(audit.read())
    done = _cli(cfg, "approve", "c-r0", stdin="y\n")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "promote" not in done.stdout  # no confirmation prompt was shown
    assert "c-r0 is fail, not awaiting_approval" in done.stderr
    assert "Traceback" not in done.stderr and len(audit.read()) == before
    refused = _cli(cfg, "reject", "c-r0", stdin="y\n")
    assert refused.returncode == 1 and "reject" not in refused.stdout
    assert "c-r0 is fail, not awaiting_approval" in refused.stderr and len(audit.read()) == before


def _candidate(proc: ServeProcess, run_id: str, seed: float) -> str:
    digest = fake_run(proc.state_dir / "artifacts", run_id, passing(), seed)
    with proc.client() as admin:
        admin.post("/v1/candidates", json={"run_id": run_id}).raise_for_status()
    return digest


def test_approve_records_the_person_with_the_token(serve) -> None:
    proc, cfg = serve
    registry, audit = Registry(proc.state_dir / "registry"), AuditLog(proc.state_dir / "audit.log")
    _candidate(proc, "r1", 1.0)
    named = _cli(cfg, "approve", "c-r1", "--yes", "--by", "Ann Lee")
    assert named.returncode == 0, named.stderr
    assert "recorded as Ann Lee (token env)" in named.stdout
    promoted = [e for e in audit.read() if e.action == "promoted"]
    assert [e.actor for e in promoted] == ["Ann Lee (token env)"]
    assert registry.pointer("m").approved_by == "Ann Lee (token env)"
    d2 = _candidate(proc, "r2", 2.0)  # gated against the new production
    with proc.client() as admin:
        assert admin.get("/v1/candidates/c-r1").json()["decided_by"] == "Ann Lee (token env)"
        bad = admin.post("/v1/candidates/c-r2/approve", json={"digest": d2, "by": "x\x1by"})
        assert bad.status_code == 422  # a name with control characters is refused
    default = _cli(cfg, "approve", "c-r2", "--yes")  # no --by: the OS user
    assert default.returncode == 0, default.stderr
    assert registry.pointer("m").approved_by == f"{getpass.getuser()} (token env)"


def test_rollback_asks_first_and_rolls_back_what_it_showed(serve) -> None:
    proc, cfg = serve
    registry, audit = Registry(proc.state_dir / "registry"), AuditLog(proc.state_dir / "audit.log")
    incumbent = registry.pointer("m").sha256
    d1 = _candidate(proc, "r1", 1.0)
    with proc.client() as admin:
        admin.post("/v1/candidates/c-r1/approve", json={"digest": d1}).raise_for_status()
    declined = _cli(cfg, "rollback", stdin="n\n")
    assert declined.returncode == 130, (declined.stdout, declined.stderr)
    assert registry.pointer("m").sha256 == d1  # "n" keeps production
    assert f"roll m back to {incumbent[:12]}?" in declined.stdout and d1[:12] in declined.stdout
    confirmed = _cli(cfg, "rollback", "--yes", "--by", "Bo")  # --yes: no question
    assert confirmed.returncode == 0, confirmed.stderr
    assert "roll m back to" not in confirmed.stdout
    assert registry.pointer("m").sha256 == incumbent
    rolled = [e for e in audit.read() if e.action == "rolled_back"]
    assert [e.actor for e in rolled] == ["Bo (token env)"]
    again = _cli(cfg, "rollback", "--yes")  # one step only: refused with one line
    assert again.returncode == 1 and "no previous version" in again.stderr


def test_reject_asks_first_and_records_the_person(serve) -> None:
    proc, cfg = serve
    audit = AuditLog(proc.state_dir / "audit.log")
    _candidate(proc, "r3", 3.0)
    kept = _cli(cfg, "reject", "c-r3", stdin="n\n")
    assert kept.returncode == 130 and "reject m@" in kept.stdout
    assert not [e for e in audit.read() if e.action == "rejected"]
    rejected = _cli(cfg, "reject", "c-r3", "--yes", "--by", "Cy", "--reason", "not now")
    assert rejected.returncode == 0, rejected.stderr
    entries = [e for e in audit.read() if e.action == "rejected"]
    assert [(e.actor, e.detail) for e in entries] == [("Cy (token env)", "not now")]


def _open_run(proc: ServeProcess) -> dict[str, Any]:
    with proc.client() as admin:
        run: dict[str, Any] = admin.post("/v1/runs", json={"reason": "cli"}).json()
    assert len(run["id"]) > 20  # no worker: the run stays queued
    return run


def test_runs_subcommands_take_the_config_after_them(serve) -> None:
    proc, cfg = serve
    run_id = _open_run(proc)["id"]
    shown = _cli(cfg, "runs", "show", run_id)  # -c after the subcommand
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["id"] == run_id
    before = _cli(cfg, "runs", "-c", str(cfg), "show", run_id, config_last=False)
    assert before.returncode == 0 and json.loads(before.stdout)["id"] == run_id
    cancelled = _cli(cfg, "runs", "cancel", run_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"run {run_id}: cancelled" in cancelled.stdout
    # the offline registry group takes -c on either side too
    production = Registry(proc.state_dir / "registry").pointer("m")
    assert production is not None
    for argv, last in ((("registry", "-c", str(cfg), "list"), False), (("registry", "list"), True)):
        listed = _cli(cfg, *argv, config_last=last)
        assert listed.returncode == 0, listed.stderr
        assert f"* {production.sha256[:16]}" in listed.stdout


def test_runs_table_shows_whole_ids_and_the_elapsed_time(serve) -> None:
    proc, cfg = serve
    run = _open_run(proc)
    time.sleep(max(0.0, run["created_at"] + 3 - time.time()))
    table = _cli(cfg, "runs")  # `patchd runs -c FILE`, COLUMNS=80
    assert table.returncode == 0, table.stderr
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    row = next(line for line in table.stdout.splitlines() if run["id"] in line)
    shown_id, state, _stage, elapsed, _reason = (c.strip() for c in row.split("│"))
    assert shown_id == run["id"] and state == "queued"
    # an open run shows the time since it was created (no stage has finished yet)
    assert 3 <= int(elapsed.rstrip("s")) <= time.time() - run["created_at"] + 1


def test_ui_login_name_is_recorded_with_the_decision(tmp_path: Path, clean_redis: str) -> None:
    for ui in start_ui_serve(tmp_path, clean_redis):
        digest = fake_run(ui.artifacts, "r1", passing(), 1.0)
        with ui.serve.client() as admin:
            admin.post("/v1/candidates", json={"run_id": "r1"}).raise_for_status()
        with httpx.Client(base_url=ui.serve.url, timeout=30) as browser:
            form = browser.get("/ui/login")
            assert 'name="name"' in form.text
            bad = browser.post(
                "/ui/login",
                data={"token": APPROVER_TOKEN, "name": "x\x1b[2J", "csrf": csrf_of(form.text)},
            )
            assert bad.status_code == 401 and "printable" in bad.text
            form = browser.get("/ui/login")
            data = {"token": APPROVER_TOKEN, "name": "Carol Ng", "csrf": csrf_of(form.text)}
            assert browser.post("/ui/login", data=data).status_code == 303
            page = browser.get("/ui/candidates/c-r1")
            assert "Carol Ng (token alice)" in page.text
            done = browser.post(
                "/ui/candidates/c-r1/approve",
                data={"digest": digest, "csrf": csrf_of(page.text)},
                headers={"Origin": ui.serve.url},
            )
            assert done.status_code == 303, done.text
        actors = [
            e.actor for e in AuditLog(ui.state / "audit.log").read() if e.action == "promoted"
        ]
        assert actors == ["Carol Ng (token alice)"]

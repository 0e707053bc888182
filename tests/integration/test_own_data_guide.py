"""docs/own-data.md followed command by command on a generated folder and model.

The test makes what a user brings (an image folder + ``labels.csv``, a classifier trained on it
and saved as safetensors), then runs the guide's commands as subprocesses against a real Redis,
a real ``patchd serve`` and a real ``patchd worker``: ``patchd init``, ``config check``,
``registry import``, ``ingest`` (predictions, then labels), ``patch --wait``, ``runs``,
``runs show``, ``candidates``, ``report`` and ``approve --by``. Only test plumbing (the Redis
URL, a free port, the trigger off so the one run is the one started here) comes from
``PATCHD_*`` variables; the file ``patchd init`` wrote is used as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from patchd.promotion.audit import AuditLog
from patchd.promotion.registry import Registry
from tests import own_data_support as own
from tests.procs import PATCHD, TOKEN, _free_port, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]
GUIDE = Path(__file__).parents[2] / "docs" / "own-data.md"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    done = subprocess.run(
        [PATCHD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, f"patchd {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done


def _serve(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """``patchd serve -c patchd.yaml`` (its port from ``PATCHD_API__PORT``), once ready."""
    env = {**os.environ, "PATCHD_TOKEN": TOKEN}
    with log.open("wb") as out:
        proc = subprocess.Popen([PATCHD, "serve", "-c", str(cfg)], stdout=out, stderr=out, env=env)
    url = f"http://127.0.0.1:{os.environ['PATCHD_API__PORT']}/readyz"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"patchd serve not ready:\n{log.read_text()}")


def _guide_commands() -> list[str]:
    """The first word after ``patchd`` of every command in the guide's shell blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    return re.findall(r"^patchd ([a-z]+(?: [a-z]+)?)", "\n".join(blocks), flags=re.M)


def test_the_guide_end_to_end(
    tmp_path: Path, clean_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path
    own.make_dataset(work / "data")
    own.train_model(work / "data", work / "model.safetensors", epochs=3)
    preds, labels = own.production_events(work / "data" / "production", 200)
    own.write_jsonl(work / "predictions.jsonl", preds)
    own.write_jsonl(work / "labels.jsonl", labels)
    for key, value in {
        "PATCHD_REDIS__URL": clean_redis,
        "PATCHD_REDIS__EMBEDDED": "never",
        "PATCHD_API__PORT": str(_free_port()),
        "PATCHD_TRIGGER__ENABLED": "false",
        "PATCHD_PATCH__TORCH_THREADS": "1",
        "PATCHD_PATCH__POLL_INTERVAL_S": "0.5",
    }.items():
        monkeypatch.setenv(key, value)

    init = _run(
        work,
        *("init", "--csv", "data/labels.csv", "--weights", "model.safetensors"),
        *("--name", "digits", "--factory-kwargs", '{"num_classes": 2, "width": 8}'),
        *("--image-size", "16"),
    )
    assert "group columns: color" in init.stdout and "wrote patchd.yaml" in init.stdout
    cfg = work / "patchd.yaml"
    _run(work, "config", "check", "-c", "patchd.yaml")
    _run(work, "registry", "import", "--weights", "model.safetensors", "-c", "patchd.yaml")

    worker = start_worker(cfg, work / "worker.log")
    serve = _serve(cfg, work / "serve.log")
    try:
        sent = _run(work, "ingest", "predictions.jsonl", "-c", "patchd.yaml")
        assert "200 accepted" in sent.stdout
        _run(work, "ingest", "labels.jsonl", "--labels", "-c", "patchd.yaml")
        patched = _run(work, "patch", "--wait", "--epochs", "20", "-c", "patchd.yaml")
        found = re.search(r"run (\S+) succeeded", patched.stdout)
        assert found, patched.stdout
        run_id = found.group(1)
        listed = _run(work, "runs", "-c", "patchd.yaml")
        assert run_id in listed.stdout
        shown = json.loads(_run(work, "runs", "show", run_id, "-c", "patchd.yaml").stdout)
        assert shown["state"] == "succeeded" and set(shown["stage_times"]) >= {"collect", "train"}
        cands = json.loads(_run(work, "candidates", "--json", "-c", "patchd.yaml").stdout)
        cand = next(c for c in cands if c["run_id"] == run_id)
        report = Path(_run(work, "report", cand["id"], "-c", "patchd.yaml").stdout.strip())
        assert report.is_file() and "worst" in report.read_text().lower()
        print("candidate", cand["id"], cand["state"], cand["gate"])
        assert cand["state"] == "awaiting_approval", cand  # the ERM shortcut model is patchable
        _run(work, "approve", cand["id"], "--yes", "--by", "Dana", "-c", "patchd.yaml")
    finally:
        for proc in (serve, worker):
            proc.terminate()
            proc.wait(timeout=30)
    state = work / ".patchd"
    assert Registry(state / "registry").pointer("digits").sha256 == cand["digest"]
    promoted = [e for e in AuditLog(state / "audit.log").read() if e.action == "promoted"]
    assert [e.actor for e in promoted] == ["Dana (token env)"]
    # every command this test ran is one the guide lists
    ran = {"init", "config check", "registry import", "ingest", "patch", "runs", "runs show"}
    ran |= {"candidates", "report", "approve", "serve", "worker"}
    listed_in_guide = set(_guide_commands())
    assert ran <= listed_in_guide | {c.split()[0] for c in listed_in_guide}, ran - listed_in_guide

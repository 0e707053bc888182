"""A Defuse patch run waits for a person's region labels: real Redis, real `patchd serve`, a real
`patchd worker`, the real `patchd` CLI.

The ``vae`` run stops after synthesize in ``awaiting_labels`` (the API, ``patchd runs`` and the
``/ui/runs`` page show it with its region count); it survives a serve restart; one region is
labelled with the CLI, another on the regions page; a read-only token cannot resume it; the page's
"Labels done, train" button (same-origin form with the session's CSRF token) resumes it, and the
defuse trainer trains with those labels (its ``region_labels.json`` names them and who gave them);
``patchd regions RUN --done`` and ``--label`` are refused afterwards.

With ``bucket``, the artifacts live in a bucket on a real S3-API server (moto, a process) and
serve, the worker and the person's CLI each have their own cache: the regions reach the pages and
the CLI, and the labels reach the train stage, only through the bucket.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration import pipeline_support as ps
from tests.procs import start_serve, write_config
from tests.ui_support import APPROVER_TOKEN, READER_TOKEN, csrf_of

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VAE_PARAMS = {
    "steps": 120,
    "max_sources": 60,
    "n_perturb": 10,
    "samples_per_region": 8,
    "heldout_per_region": 4,
    "components": 3,
    "min_weight": 0.02,
}


def _cli(config_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ps.PATCHD, *args, "-c", str(config_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def _in_bucket(s3: dict[str, Any], cache: Path) -> dict[str, Any]:
    return {
        "root": f"{s3['url']}/artifacts",
        "cache_dir": str(cache),
        "storage_options": s3["storage_options"],
    }


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_defuse_run_waits_for_labels_and_trains_with_them(
    tmp_path: Path, clean_redis: str, where: str, request: pytest.FixtureRequest
) -> None:
    incumbent = tmp_path / "incumbent.safetensors"
    ps.make_incumbent(incumbent, epochs=2)
    patch: dict[str, Any] = {
        "augmenter": "vae",
        "trainer": "defuse",
        "params": {"vae": VAE_PARAMS, "defuse": {"epochs": 1, "select": "last"}},
    }
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{APPROVER_TOKEN} read,approve alice\n{READER_TOKEN} read bob\n")
    tokens.chmod(0o600)
    config = ps.base_config(tmp_path, clean_redis, incumbent, **patch)
    config.update({"ui": {"enabled": True}, "api": {"token_file": str(tokens)}})
    cli_path = config_path = write_config(tmp_path, config)
    worker_path = config_path
    if where == "bucket":
        s3 = request.getfixturevalue("s3_bucket")
        config["api"]["port"] = yaml.safe_load(config_path.read_text())["api"]["port"]
        config["artifacts"] = _in_bucket(s3, tmp_path / "serve-cache")
        config_path = write_config(tmp_path, config)
        for machine in ("worker", "person"):  # their own config: their own cache
            (tmp_path / machine).mkdir()
            mine = {**config, "artifacts": _in_bucket(s3, tmp_path / machine / "cache")}
            path = write_config(tmp_path / machine, mine)
            worker_path, cli_path = (path, cli_path) if machine == "worker" else (worker_path, path)
    worker = ps.worker(worker_path, tmp_path / "worker.log")
    serve = start_serve(tmp_path, {}, config_path=config_path)
    try:
        client = serve.client()
        preds, labels = ps.write_events(tmp_path / "images", 40)
        assert client.post("/v1/predictions", json=preds).json()["accepted"] == 40
        assert client.post("/v1/labels", json=labels).json()["rejected"] == []
        run = client.post("/v1/runs", json={"reason": "defuse"}).json()
        assert list(run["job_ids"]) == ["collect", "mine", "synthesize"]
        paused = ps.wait_run(client, run["id"], ("awaiting_labels",), timeout=120)
        n_regions = paused["labels"]["regions"]
        assert n_regions >= 1 and paused["stage"] == "synthesize" and paused["error"] is None
        run_dir = tmp_path / ("serve-cache" if where == "bucket" else "state/artifacts")
        run_dir = run_dir / "runs" / run["id"]
        assert not (run_dir / "train").exists()

        listed = _cli(config_path, {**serve.env, "COLUMNS": "220"}, "runs")
        assert listed.returncode == 0, listed.stderr
        assert (
            "awaiting_labels" in listed.stdout
            and f"{n_regions} failure regions await labels" in listed.stdout
        )

        serve.stop()  # the pause is in the run record: a new serve keeps waiting
        serve = start_serve(tmp_path, {}, config_path=config_path)
        client = serve.client()
        again = ps.wait_run(client, run["id"], ("awaiting_labels",), timeout=10)
        assert again["labels"] == paused["labels"] and "train" not in again["job_ids"]

        regions = json.loads((run_dir / "synthesize" / "regions.json").read_text())["regions"]
        region, on_page = regions[0], regions[-1]
        other = next(c for c in ps.CLASS_NAMES if c != region["source_name"])
        labelled = _cli(
            cli_path, serve.env, "regions", run["id"], "--label", f"{region['region']}={other}"
        )
        assert labelled.returncode == 0, labelled.stderr
        assert f"{other} (by person)" in labelled.stdout

        reader = serve.client(READER_TOKEN).post(f"/v1/runs/{run['id']}/resume")
        assert reader.status_code == 403, reader.text
        assert client.get(f"/v1/runs/{run['id']}").json()["state"] == "awaiting_labels"

        with httpx.Client(base_url=serve.url, timeout=30) as browser:
            form = browser.get("/ui/login")
            login = {"token": APPROVER_TOKEN, "name": "Ana Lee", "csrf": csrf_of(form.text)}
            assert browser.post("/ui/login", data=login).status_code == 303
            runs_page = browser.get("/ui/runs").text
            assert f"{n_regions} regions await labels" in runs_page
            page = browser.get(f"/ui/runs/{run['id']}/regions")
            assert "Labels done, train" in page.text and "awaiting labels" in page.text
            csrf = csrf_of(page.text)
            url = f"/ui/runs/{run['id']}/regions"
            if on_page["region"] != region["region"]:
                saved = browser.post(
                    f"{url}/{on_page['region']}/label", data={"label": "invalid", "csrf": csrf}
                )
                assert saved.status_code == 303, saved.text
            no_csrf = browser.post(f"{url}/done", data={})
            assert no_csrf.status_code == 403
            resumed = browser.post(f"{url}/done", data={"csrf": csrf})
            assert resumed.status_code == 303
            assert resumed.headers["location"].endswith("?msg=resumed")
            after = browser.get(f"{url}?msg=resumed").text
            assert "Labelling done" in after and "Resumed to train by Ana Lee" in after
            assert "Labels done, train" not in after

        done = _cli(cli_path, serve.env, "regions", run["id"], "--done")
        assert done.returncode == 1 and "only a run awaiting labels" in done.stderr
        late = _cli(
            cli_path, serve.env, "regions", run["id"], "--label", f"{region['region']}=invalid"
        )
        assert late.returncode == 1 and "past labelling" in late.stderr

        finished = ps.wait_run(client, run["id"], ("succeeded",), timeout=120)
        print("stage seconds (defuse, paused for labels):", finished["stage_times"])
    finally:
        ps.stop_worker(worker)
        serve.stop()
    assert finished["labels"]["by"] == "Ana Lee (token alice)"
    assert finished["labels"]["regions"] == n_regions
    assert set(finished["stage_times"]) == {"collect", "mine", "synthesize", "train", "evaluate"}
    if where == "bucket":  # the worker's output, read from the bucket as a third machine would
        from patchd.config import build_config
        from patchd.runs.artifacts import RunArtifacts

        reader = build_config({"artifacts": _in_bucket(s3, tmp_path / "reader")})
        RunArtifacts.from_config(reader).fetch(run["id"], "train", ["region_labels.json"])
        run_dir = tmp_path / "reader" / "runs" / run["id"]
        assert not (tmp_path / "person" / "cache" / "runs" / run["id"] / "train").exists()
    used = json.loads((run_dir / "train" / "region_labels.json").read_text())["regions"]
    assert used[str(region["region"])] == {"label": other, "by": "person", "source_class": False}
    if on_page["region"] != region["region"]:
        page_label = {"label": "invalid", "by": "Ana Lee (token alice)", "source_class": False}
        assert used[str(on_page["region"])] == page_label
    for r in regions[1:-1]:
        assert used[str(r["region"])]["source_class"] is True
    serve_run = tmp_path / ("serve-cache" if where == "bucket" else "state/artifacts")
    done_path = serve_run / "runs" / run["id"] / "regions" / "done.json"
    done_by = json.loads(done_path.read_text())["by"]
    assert done_by == "Ana Lee (token alice)"
    assert "resumed by Ana Lee (token alice)" in serve.log()

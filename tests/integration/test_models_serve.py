"""Two models in one real ``patchd serve`` (``models:``): events route by their ``model`` field,
an unknown or missing model is a counted rejection, each model has its own monitor, routes and
``model``-labelled metrics, and one model's failing patch run does not stall the other's monitor.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.procs import ServeProcess, start_serve

pytestmark = [pytest.mark.integration]

MODELS = {"cats": ["a", "b"], "dogs": ["x", "y", "z"]}


def events(model: str, start: int, n: int, acc: float, seed: int) -> tuple[list[Any], list[Any]]:
    rng = np.random.default_rng(seed)
    k = len(MODELS[model])
    preds, labels = [], []
    for i in range(start, start + n):
        y = int(rng.integers(0, k))
        pred = y if rng.random() < acc else (y + 1) % k
        site = "A" if rng.random() < 0.5 else "B"
        rid = f"{model}-{i}"
        preds.append({"id": rid, "model": model, "pred": pred, "groups": {"site": site}})
        labels.append({"id": rid, "model": model, "label": y})
    return preds, labels


def post(client: httpx.Client, preds: list[Any], labels: list[Any]) -> None:
    for path, body in (("/v1/predictions", preds), ("/v1/labels", labels)):
        r = client.post(path, json=body)
        assert r.status_code in (200, 202), r.text
        assert r.json()["rejected"] == [], r.text


def wait_n(client: httpx.Client, model: str, n: int, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/models/{model}/groups").json()
        if doc["n"] >= n:
            return doc
        time.sleep(0.1)
    raise AssertionError(f"the {model} monitor did not reach {n} labeled events: {doc}")


@pytest.fixture(params=["sqlite", "postgres"])
def served(request: pytest.FixtureRequest, tmp_path: Path, clean_redis: str) -> Any:
    store = {"url": request.getfixturevalue("postgres_url")} if request.param == "postgres" else {}
    overrides = {
        "store": store,
        "redis": {"url": clean_redis, "embedded": "never"},
        "groups": {"attributes": ["site"], "values": {"site": ["A", "B"]}},
        "monitor": {"interval_s": 0.2, "window": 5000, "reference_window": 200, "n_min": 20},
        "trigger": {"min_interval_s": 0},
        "ui": {"enabled": True, "anonymous_read": True},
        "models": [
            {"name": "cats", "class_names": MODELS["cats"]},
            {
                "name": "dogs",
                "class_names": MODELS["dogs"],
                # every dogs cell is below this floor: a patch run is requested, and it fails
                # (dogs has no weights and no registry version)
                "monitor": {"accuracy_floor": 0.99, "cooldown_s": 0},
            },
        ],
    }
    proc = start_serve(tmp_path, overrides)
    yield proc
    proc.stop()


def test_two_models_route_monitor_and_fail_apart(served: ServeProcess) -> None:
    client = served.client()
    post(client, *events("cats", 0, 600, 0.9, 1))
    post(client, *events("dogs", 0, 400, 0.5, 2))

    bad = [
        {"id": "n-1", "model": "nope", "pred": 0},
        {"id": "n-2", "pred": 0},
        {"id": "ok-1", "model": "cats", "pred": 1},
    ]
    r = client.post("/v1/predictions", json=bad)
    assert r.status_code in (200, 202), r.text
    rejected = {e["index"]: e for e in r.json()["rejected"]}
    assert rejected[0]["reason"] == "unknown_model" and "cats, dogs" in rejected[0]["message"]
    assert rejected[1]["reason"] == "missing_field" and "model" in rejected[1]["message"]
    assert r.json()["accepted"] == 1

    cats, dogs = wait_n(client, "cats", 600), wait_n(client, "dogs", 400)
    assert cats["model"] == "cats" and dogs["model"] == "dogs"
    assert {c["class"] for c in cats["cells"]} == {"*", "a", "b"}
    assert {c["class"] for c in dogs["cells"]} == {"*", "x", "y", "z"}

    # routes: the unprefixed form names the models; an unknown model is a 404 naming them
    r = client.get("/v1/groups")
    assert r.status_code == 400 and "cats, dogs" in r.json()["error"], r.text
    r = client.get("/v1/models/nope/groups")
    assert (
        r.status_code == 404
        and "'nope'" in r.json()["error"]
        and r.json()["models"]
        == [
            "cats",
            "dogs",
        ]
    )
    assert client.get("/v1/models").json() == {"models": ["cats", "dogs"]}
    assert httpx.get(served.url + "/v1/models/nope/groups").status_code == 401  # no token
    status = client.get("/v1/status").json()
    assert status["models"]["cats"]["labeled"] == 600
    assert status["models"]["dogs"]["labeled"] == 400

    # dogs: degraded below its floor, a run requested that fails; cats keeps its monitor
    run = _wait_failed_run(client, "dogs", served)
    assert run["model"] == "dogs" and run["state"] == "failed", run
    assert client.get("/v1/models/cats/runs").json()["runs"] == []
    post(client, *events("cats", 600, 400, 0.9, 3))
    cats = wait_n(client, "cats", 1000)
    assert not [c for c in cats["cells"] if c["state"] == "degraded"], cats["cells"]

    _assert_cli(served)
    # the approval pages cover every model: dogs' failed run is listed with its model, and the
    # models page shows both monitors
    runs_page = client.get("/ui/runs")
    assert runs_page.status_code == 200 and run["id"] in runs_page.text, runs_page.text
    assert "<th>model</th>" in runs_page.text and "<td>dogs</td>" in runs_page.text
    models_page = client.get("/ui/models")
    assert models_page.status_code == 200
    assert "cats" in models_page.text and "dogs" in models_page.text
    assert client.get("/ui/candidates").status_code == 200
    metrics = client.get("/metrics").text
    assert 'patchd_group_samples{class="*",group="site=A",model="cats"}' in metrics
    assert 'patchd_group_samples{class="*",group="site=A",model="dogs"}' in metrics
    assert _sample(metrics, 'patchd_runs_total{model="dogs",result="failed"}') >= 1
    assert _sample(metrics, 'patchd_runs_total{model="cats",result="failed"}') == 0
    assert 'reason="unknown_model"' in metrics and 'reason="missing_field"' in metrics

    # the unprefixed form, when the request names the model: ?model=, a run's id, a body field
    assert client.get("/v1/groups", params={"model": "cats"}).json()["model"] == "cats"
    assert client.get(f"/v1/runs/{run['id']}").json()["model"] == "dogs"
    assert client.get("/v1/runs/no-such-run").status_code == 400  # names no model
    r = client.post("/v1/runs", json={"model": "cats", "reason": "manual"})
    assert r.status_code == 201 and r.json()["model"] == "cats", r.text
    r = client.get("/v1/groups", params={"model": "nope"})
    assert r.status_code == 404 and r.json()["models"] == ["cats", "dogs"], r.text


def _wait_failed_run(
    client: httpx.Client, model: str, served: ServeProcess, timeout: float = 30
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = client.get(f"/v1/models/{model}/runs").json()["runs"]
        if runs and runs[0]["state"] == "failed":
            return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"no failed {model} run: {runs}\n{served.log()[-4000:]}")


def _sample(metrics: str, series: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not exported")


def _assert_cli(served: ServeProcess) -> None:
    """Model-scoped commands need --model with several models, and use that model's routes."""
    import json

    from click.testing import CliRunner

    from patchd.cli import cli

    env = {"PATCHD_CONFIG": str(served.config_path), "PATCHD_TOKEN": served.token}
    missing = CliRunner().invoke(cli, ["status", "--json"], env=env)
    assert missing.exit_code == 2 and "cats, dogs" in missing.output, missing.output
    unknown = CliRunner().invoke(cli, ["runs", "--model", "nope"], env=env)
    assert unknown.exit_code == 2 and "unknown model 'nope'" in unknown.output, unknown.output
    ok = CliRunner().invoke(cli, ["status", "--json", "--model", "dogs"], env=env)
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["groups"]["model"] == "dogs"
    table = CliRunner().invoke(cli, ["status", "--model", "cats"], env=env, terminal_width=200)
    assert table.exit_code == 0 and "model cats: " in table.output, table.output
    assert "1001 predictions" in table.output, table.output  # 1000 + the one accepted above
    runs = CliRunner().invoke(cli, ["runs", "--json", "--model", "dogs"], env=env)
    assert runs.exit_code == 0 and json.loads(runs.output)[0]["model"] == "dogs", runs.output

"""Bad input: each a clear error on the run, never a crashed worker loop.

One real `patchd worker --burst` process takes five broken runs in a row (a factory path that
does not import, weights that do not fit the architecture, a dataset CSV with a missing file, a
CSV with an unknown label, an empty production slice). Each run fails at the right stage with a
message naming the problem and the fix, without retries, and the worker exits normally after
draining the queue.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from patchd.config import build_config
from patchd.runs import jobqueue
from patchd.runs.component import assess
from patchd.runs.recipe import build_recipe
from patchd.workers.artifacts import sha256_file
from tests.integration import pipeline_support as ps

pytestmark = pytest.mark.integration

PATCHD = str(Path(sys.executable).with_name("patchd"))


def _csv_dataset(root: Path, rows: list[str]) -> dict[str, Any]:
    root.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / f"ok{i}.png")
    (root / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return {"kind": "image-csv", "root": str(root), "image_size": 16, "class_names": ["0-4", "5-9"]}


def _cases(tmp_path: Path, weights: Path) -> dict[str, tuple[dict[str, Any], str, list[str]]]:
    ok_rows = ["ok0.png,0-4,train", "ok1.png,5-9,train", "ok2.png,0-4,val", "ok3.png,5-9,test"]
    missing = _csv_dataset(tmp_path / "csv-missing", [*ok_rows, "gone.png,0-4,train"])
    unknown = _csv_dataset(tmp_path / "csv-unknown", [*ok_rows, "ok0.png,cat,train"])
    no_slice = {"data": {"use_production_slice": True}}
    return {
        "factory": (
            {"model": {"factory": "no_such_package.nets:tiny"}},
            "collect",
            ["factory 'no_such_package.nets:tiny'", "cannot import module"],
        ),
        "weights": (
            {"model": {"factory_kwargs": {"width": 16}}},
            "collect",
            [str(weights), "do not match the architecture", "factory_kwargs"],
        ),
        "csv-missing": (
            {"data": {"train": missing}},
            "collect",
            ["data.train (image-csv)", "gone.png", "does not exist"],
        ),
        "csv-unknown": (
            {"data": {"train": unknown}},
            "collect",
            ["label 'cat' is not a known class", "class_names"],
        ),
        "empty-slice": (
            no_slice,
            "collect",
            ["production slice", "no usable labeled events", "data.use_production_slice: false"],
        ),
    }


def _config(tmp_path: Path, redis_url: str, weights: Path, extra: dict[str, Any]) -> Any:
    base = ps.base_config(tmp_path, redis_url, weights)
    base["data"]["use_production_slice"] = False
    base["state_dir"] = str(tmp_path / "state")
    for section, values in extra.items():
        base[section] = {**base.get(section, {}), **values}
    return build_config(base)


def test_bad_inputs_fail_their_run_clearly_and_the_worker_survives(
    tmp_path: Path, clean_redis: str
) -> None:
    weights = tmp_path / "incumbent.safetensors"
    ps.make_incumbent(weights, epochs=1)
    conn = jobqueue.connect(clean_redis)
    cases = _cases(tmp_path, weights)
    runs = {}
    for name, (extra, _, _) in cases.items():
        config = _config(tmp_path, clean_redis, weights, extra)
        recipe = build_recipe(
            config, (weights, sha256_file(weights), "config"), tmp_path / "none.jsonl", 0
        )
        run_id = f"bad-{name}"
        runs[name] = jobqueue.enqueue_run(
            conn, config, run_id, str(config.artifacts_root), recipe.to_json()
        )
    config_path = tmp_path / "worker.yaml"
    config_path.write_text(
        yaml.safe_dump({"redis": {"url": clean_redis}, "patch": {"torch_threads": 1}})
    )
    started = time.monotonic()
    proc = subprocess.run(
        [PATCHD, "worker", "-c", str(config_path), "--burst"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"burst worker drained 5 bad runs in {time.monotonic() - started:.1f}s")
    for name, (_, stage, needles) in cases.items():
        states = {s: jobqueue.job_state(conn, j) for s, j in runs[name].items()}
        prog = assess(states)
        print(f"{name}: {prog.error}")
        assert (prog.state, prog.stage) == ("failed", stage), (name, prog)
        assert prog.error is not None and prog.error.startswith(f"{stage}: ")
        for needle in needles:
            assert needle in prog.error, (name, needle, prog.error)
        assert "Traceback" not in prog.error
        assert states[stage].status == "failed"
        assert all(
            states[s].status == "deferred"
            for s in jobqueue.STAGES[jobqueue.STAGES.index(stage) + 1 :]
        )
    assert proc.stderr.count("Work-horse terminated unexpectedly") == 0
    assert proc.stderr.count("enqueued for retry") == 0  # bad input is not retried

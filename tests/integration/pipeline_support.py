"""Helpers for the pipeline integration tests: an incumbent, production events, polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.procs import start_worker

PATCHD = str(Path(sys.executable).with_name("patchd"))
CLASS_NAMES = ["0-4", "5-9"]
FACTORY_KWARGS = {"width": 8}


def make_incumbent(path: Path, epochs: int = 1) -> str:
    """A small CNN trained briefly on colored-digits (it learns the colour shortcut)."""
    import torch

    from patchd.config import DatasetSpec, ModelConfig
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import build_model, save_weights
    from patchd.ml.training import fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(ModelConfig(factory_kwargs=FACTORY_KWARGS, class_names=CLASS_NAMES))
    fit(model, load_splits(DatasetSpec(kind="colored-digits")).train, epochs=epochs, seed=0)
    return save_weights(model, path)


def write_events(root: Path, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` colored-digits test images as PNG files plus their prediction and label records."""
    import numpy as np
    from PIL import Image

    from patchd.config import DatasetSpec
    from patchd.ml.datasets import load_splits

    test = load_splits(DatasetSpec(kind="colored-digits", seed=1)).test
    root.mkdir(parents=True, exist_ok=True)
    preds, labels = [], []
    for i in range(min(n, len(test))):
        path = root / f"img-{i}.png"
        arr = (test.x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).save(path)
        color = test.group_names[int(test.g[i])].split("=")[1]
        preds.append(
            {
                "id": f"e{i}",
                "pred": 0,
                "probs": [0.6, 0.4],
                "groups": {"color": color},
                "input": {"uri": path.as_uri()},
            }
        )
        labels.append({"id": f"e{i}", "label": int(test.y[i])})
    return preds, labels


def base_config(tmp_path: Path, redis_url: str, weights: Path, **patch: Any) -> dict[str, Any]:
    return {
        "redis": {"url": redis_url, "embedded": "never"},
        "model": {
            "name": "digits",
            "factory": "patchd.ml.models:small_cnn",
            "factory_kwargs": FACTORY_KWARGS,
            "weights": str(weights),
            "class_names": CLASS_NAMES,
        },
        "groups": {"attributes": ["color"]},
        "data": {"train": {"kind": "colored-digits"}, "use_production_slice": True},
        "sources": {"allowed_roots": [str(tmp_path / "images")]},
        "trigger": {"enabled": False},
        "patch": {
            "miner": "svm",
            "augmenter": "none",
            "trainer": "erm",
            "budget": {"epochs": 1, "batch_size": 64},
            "retries": 2,
            "poll_interval_s": 0.5,
            "job_monitoring_interval_s": 1,
            "heartbeat_grace_s": 3,
            "torch_threads": 1,
            **patch,
        },
    }


def wait_run(
    client: httpx.Client,
    run_id: str,
    until: tuple[str, ...],
    timeout: float = 90,
    stage: str | None = None,
) -> dict[str, Any]:
    """Poll ``GET /v1/runs/{id}`` until its state is in ``until`` (and at ``stage`` if given)."""
    deadline = time.monotonic() + timeout
    run: dict[str, Any] = {}
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["state"] in until and (stage is None or run["stage"] == stage):
            return run
        if run["state"] in ("succeeded", "failed", "cancelled") and run["state"] not in until:
            break
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not reach {until}/{stage}: {run}")


def kill_worker_tree(proc: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL the worker and its work horse (which runs in its own process group)."""
    import psutil

    pids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)] + [proc.pid]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)
    return pids


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_worker_tree(proc)


def worker(config_path: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return start_worker(config_path, log, *extra)

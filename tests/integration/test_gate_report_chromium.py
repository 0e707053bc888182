"""The candidate report opened in a real headless Chromium; the screenshot is kept for a look."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from patchd.domain import EventBus
from patchd.promotion.component import CandidatesComponent
from patchd.services import Services
from patchd.store.db import Store
from tests.gate_support import fake_run, make_config, passing, png_bytes, write_weights

CHROMIUM = "/usr/bin/chromium"
RUN = "m-20261123T160000-abc123"


def _add_run_record(store: Store) -> None:
    """A runs row as the pipeline writes it (recipe + stage timings) for the report to show."""
    recipe = {
        "miner": "svm",
        "augmenter": "cyclegan",
        "trainer": "camel",
        "incumbent_sha256": "x",
        "slice_rows": 5000,
        "config": {"patch": {"budget": {"epochs": 4, "batch_size": 64}}},
    }
    times = {"collect": 3.2, "mine": 11.5, "synthesize": 94.0, "train": 61.3, "evaluate": 2.1}
    now = time.time()
    with store.write() as conn:
        conn.execute(
            "INSERT INTO runs (id, model, state, reason, recipe, job_ids, stage_times, created_at,"
            " updated_at) VALUES (?, 'm', 'succeeded', 'GroupDegraded top|color=green', ?, '{}',"
            " ?, ?, ?)",
            (RUN, json.dumps(recipe), json.dumps(times), now, now),
        )


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _pixel_rows_differ(path: Path) -> bool:
    """The screenshot is not one flat colour (a blank page would be)."""
    data = path.read_bytes()
    return len(set(data[100:5000])) > 20


def _finished_run(tmp_path: Path) -> tuple[Services, CandidatesComponent]:
    """A candidates component with an incumbent and a finished run RUN waiting to be gated."""
    config = make_config(tmp_path)
    services = Services(
        config,
        Store.open(config.store_path),
        EventBus(),
        CollectorRegistry(),
        BackgroundScheduler(),
        "redis://unused",
    )
    comp = CandidatesComponent(services)
    write_weights(tmp_path / "inc.safetensors", 9.0)
    comp.registry.import_model("m", tmp_path / "inc.safetensors", "setup")
    _add_run_record(services.store)
    fake_run(config.artifacts_root, RUN, passing(), 1.0, png_bytes(256, 160))
    return services, comp


def _screenshot(html: Path, shot: Path, tmp_path: Path, size: str) -> None:
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            f"--screenshot={shot}",
            f"--window-size={size}",
            html.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.integration
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    services, comp = _finished_run(tmp_path)
    cand = comp.evaluate_run(RUN, "m")
    html = comp.registry.version_dir("m", cand.digest) / "report.html"
    text = html.read_text()
    assert "PASS: the patch clears the gate" in text and "data:image/png;base64," in text
    assert "camel" in text and "synthesize" in text
    shot = tmp_path / "report.png"
    _screenshot(html, shot, tmp_path, "1280,1600")
    assert _png_size(shot) == (1280, 1600)
    assert _pixel_rows_differ(shot)
    keep = os.environ.get("PATCHD_KEEP_SCREENSHOTS")  # e.g. benchmarks/results, to refresh it
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "gate_report.png")
    services.store.close()


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fidelity"


@pytest.mark.integration
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed")
def test_report_shows_synthesis_fidelity_beside_the_previews(tmp_path: Path) -> None:
    """Previews and fidelity.json as a maskpaste run on sticker-fmnist wrote them (fixtures
    recorded from `patchd bench quality --dataset sticker-fmnist`, seed 0, 25 per minority)."""
    services, comp = _finished_run(tmp_path)
    config = services.config
    synth = config.artifacts_root / "runs" / RUN / "synthesize"
    shutil.copytree(FIXTURES / "previews", synth / "previews", dirs_exist_ok=True)
    shutil.copyfile(FIXTURES / "fidelity.json", synth / "fidelity.json")
    cand = comp.evaluate_run(RUN, "m")
    html = comp.registry.version_dir("m", cand.digest) / "report.html"
    text = html.read_text()
    assert "Synthesis fidelity" in text and "train-on-translated" in text
    recorded = json.loads((FIXTURES / "fidelity.json").read_text())
    dropped = [d for d in recorded["directions"] if d["verdict"] != "kept"]
    assert text.count("dropped") >= len(dropped)
    previews = len(list((FIXTURES / "previews").glob("*.png")))
    assert text.count("<figcaption>Synthesized: maskpaste") == previews
    shot = tmp_path / "report.png"
    _screenshot(html, shot, tmp_path, "1280,2400")
    assert _pixel_rows_differ(shot)
    keep = os.environ.get("PATCHD_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(keep) / "report_fidelity.png")
    services.store.close()

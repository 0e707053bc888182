"""A run whose fine-tuning never beats the incumbent ends "no improvement, incumbent kept"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from patchd.config import build_config
from patchd.ml.models import build_model, save_weights
from patchd.runs.recipe import build_recipe
from patchd.runs.records import NO_IMPROVEMENT, RunRecord
from patchd.workers import jobs
from patchd.workers.stages import learn

torch.set_num_threads(1)


def _run(tmp_path: Path, lr: float, **patch: Any) -> dict[str, dict[str, Any]]:
    config = build_config(
        {
            "state_dir": str(tmp_path / "state"),
            "model": {"factory_kwargs": {"width": 4}, "class_names": ["0-4", "5-9"]},
            "data": {"train": {"kind": "colored-digits"}, "use_production_slice": False},
            "patch": {
                "miner": "svm",
                "trainer": "gdro",  # keeps the best epoch on validation (epoch 0: incumbent)
                "budget": {"epochs": 1, "lr": lr, "batch_size": 64},
                **patch,
            },
        }
    )
    weights = tmp_path / "incumbent.safetensors"
    torch.manual_seed(0)
    sha = save_weights(build_model(config.model), weights)
    recipe = build_recipe(config, (weights, sha, "config"), tmp_path / "slice.jsonl", 0).to_json()
    root = str(config.artifacts_root)
    stages = (jobs.collect, jobs.mine, jobs.synthesize, jobs.train, jobs.evaluate)
    return {fn.__name__: fn("r1", root, recipe) for fn in stages}


def test_no_better_epoch_keeps_the_incumbent_and_writes_no_candidate(tmp_path: Path) -> None:
    done = _run(tmp_path, lr=1e-12)  # no step can change a prediction: epoch 0 is kept
    train, evaluate = done["train"], done["evaluate"]
    assert train["result"]["outcome"] == NO_IMPROVEMENT and train["result"]["sha256"] is None
    assert "model.safetensors" not in train["files"]
    assert "no fine-tuning epoch beat the incumbent" in train["result"]["message"]
    assert evaluate["result"]["outcome"] == NO_IMPROVEMENT
    assert evaluate["result"]["candidate_sha256"] is None
    assert "evaluation.json" not in evaluate["files"]
    rec = RunRecord(
        "r1", "model", "succeeded", "evaluate", "", {}, {}, {}, None, evaluate, 0.0, 0.0
    )
    body = rec.to_dict()
    assert body["outcome"] == NO_IMPROVEMENT
    assert "incumbent kept" in body["outcome_message"]
    assert body["disk_bytes"] == evaluate["result"]["run_disk_bytes"] > 0


def test_an_improving_run_still_registers_its_weights(tmp_path: Path) -> None:
    done = _run(tmp_path, lr=3e-3)
    assert done["train"]["result"]["outcome"] == "candidate"
    assert "model.safetensors" in done["train"]["files"]
    assert done["evaluate"]["result"]["outcome"] == "candidate"


def test_the_message_says_what_was_found() -> None:
    history = (
        {"epoch": 0.0, "val_worst": 0.6, "val_avg": 0.9},
        {"epoch": 1.0, "val_worst": 0.55, "val_avg": 0.91},
        {"epoch": 2.0, "val_worst": 0.58, "val_avg": 0.88},
    )
    message = learn.no_improvement_message(history)
    assert message.endswith(
        "incumbent kept (incumbent val worst-group 0.600, best of 2 epoch(s) 0.580 (epoch 2))"
    )


@pytest.mark.parametrize("state", ["failed", "running"])
def test_only_a_succeeded_run_has_an_outcome(state: str) -> None:
    rec = RunRecord("r1", "m", state, "train", "", {}, {}, {}, None, None, 0.0, 0.0)
    assert rec.outcome is None and rec.to_dict()["outcome_message"] is None


def test_a_cyclegan_run_stores_its_translations_compactly_and_trains_on_them(
    tmp_path: Path,
) -> None:
    from patchd.workers import artifacts

    done = _run(
        tmp_path,
        lr=3e-3,
        augmenter="cyclegan",
        trainer="camel",
        params={"cyclegan": {"steps": 4}},
        fidelity={"enabled": False},
    )
    synth = done["synthesize"]
    path = Path(synth["dir"]) / "augmentation.safetensors"
    train = artifacts.load_imageset(Path(done["collect"]["dir"]) / "train.safetensors")
    aug = artifacts.load_augmentation(path, train.x)
    assert set(aug.paired) == {"F", "G"} and aug.paired["F"].shape == train.x.shape
    assert path.stat().st_size < 2 * train.x.numel() * 4 / 3  # uint8, not float32
    assert synth["result"]["disk_bytes"] >= path.stat().st_size
    assert done["train"]["result"]["outcome"] in ("candidate", NO_IMPROVEMENT)

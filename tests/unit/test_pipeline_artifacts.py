"""Stage artifacts: atomic publication, manifest verification, idempotent stage re-runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from patchd.abc import Augmentation
from patchd.config import build_config
from patchd.exceptions import IntegrityError, StageError
from patchd.ml.data import ImageSet
from patchd.runs.recipe import build_recipe
from patchd.workers import artifacts, jobs


def _publish(tmp_path: Path, files: dict[str, bytes]) -> Path:
    final = artifacts.stage_dir(tmp_path, "r1", "mine")
    with artifacts.building(final) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        artifacts.publish(tmp, final, "r1", {"n": 1})
    return final


def test_publish_then_verify_round_trip(tmp_path: Path) -> None:
    final = _publish(tmp_path, {"a.bin": b"abc", "previews/p.png": b"png"})
    manifest = artifacts.verify(final)
    assert manifest.stage == "mine" and manifest.run_id == "r1" and manifest.result == {"n": 1}
    assert set(manifest.files) == {"a.bin", "previews/p.png"}
    assert manifest.files["a.bin"] == artifacts.sha256_file(final / "a.bin")
    assert json.loads((final / "manifest.json").read_text())["schema"] == 1
    assert not list(final.parent.glob(".tmp-*"))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: (d / "a.bin").write_bytes(b"abd"),
        lambda d: (d / "extra.bin").write_bytes(b"x"),
        lambda d: (d / "a.bin").unlink(),
        lambda d: (d / "manifest.json").write_text("{not json"),
    ],
    ids=["changed", "extra", "missing", "bad-manifest"],
)
def test_verify_rejects_tampering(tmp_path: Path, tamper: Any) -> None:
    final = _publish(tmp_path, {"a.bin": b"abc"})
    tamper(final)
    with pytest.raises(IntegrityError):
        artifacts.verify(final)


def test_existing_moves_a_bad_dir_aside(tmp_path: Path) -> None:
    final = _publish(tmp_path, {"a.bin": b"abc"})
    (final / "a.bin").write_bytes(b"corrupt")
    assert artifacts.existing(final) is None
    assert not final.exists()
    assert len(list(final.parent.glob(".bad-mine-*"))) == 1


def test_failed_build_leaves_nothing_and_stale_temps_are_cleared(tmp_path: Path) -> None:
    final = artifacts.stage_dir(tmp_path, "r1", "train")
    final.parent.mkdir(parents=True)
    (final.parent / ".tmp-train-deadbeef").mkdir()  # left by a killed attempt
    with pytest.raises(RuntimeError), artifacts.building(final) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not final.exists()
    assert not list(final.parent.glob(".tmp-*"))


def test_publish_keeps_the_first_complete_output(tmp_path: Path) -> None:
    first = _publish(tmp_path, {"a.bin": b"one"})
    with artifacts.building(first) as tmp:  # a slower duplicate attempt finishing later
        (tmp / "a.bin").write_bytes(b"two")
        manifest = artifacts.publish(tmp, first, "r1", {})
    assert (first / "a.bin").read_bytes() == b"one"
    assert manifest.files["a.bin"] == artifacts.sha256_file(first / "a.bin")
    assert not list(first.parent.glob(".tmp-*"))


def _imageset(n: int = 5) -> ImageSet:
    g = torch.tensor([0, 1, -1, 0, 1][:n])
    return ImageSet(
        torch.rand(n, 3, 4, 4),
        torch.arange(n) % 2,
        g,
        ("a", "b"),
        ("color=red", "color=green"),
        tuple(f"i{i}" for i in range(n)),
    )


def test_imageset_and_augmentation_round_trip(tmp_path: Path) -> None:
    data = _imageset()
    artifacts.save_imageset(data, tmp_path / "train.safetensors")
    back = artifacts.load_imageset(tmp_path / "train.safetensors")
    assert torch.equal(back.x, data.x) and torch.equal(back.g, data.g)
    assert back.ids == data.ids and back.group_names == data.group_names
    aug = Augmentation(
        kind="cyclegan", paired={"F": torch.rand(5, 3, 4, 4)}, extra=data, info={"steps": 3}
    )
    artifacts.save_augmentation(aug, tmp_path / "augmentation.safetensors")
    got = artifacts.load_augmentation(tmp_path / "augmentation.safetensors")
    assert got.kind == "cyclegan" and got.info == {"steps": 3}
    assert torch.equal(got.paired["F"], aug.paired["F"]) and got.extra is not None
    assert torch.equal(got.extra.x, data.x)
    artifacts.save_augmentation(Augmentation(kind="none"), tmp_path / "empty.safetensors")
    empty = artifacts.load_augmentation(tmp_path / "empty.safetensors")
    assert empty.paired == {} and empty.extra is None


def _recipe_json(tmp_path: Path) -> str:
    config = build_config({"state_dir": str(tmp_path)})
    return build_recipe(
        config, (tmp_path / "w.safetensors", "0" * 64, "config"), tmp_path / "slice.jsonl", 0
    ).to_json()


def test_run_stage_is_idempotent(tmp_path: Path) -> None:
    calls: list[Path] = []

    def fn(*, out: Path, **_: Any) -> dict[str, Any]:
        calls.append(out)
        (out / "x.bin").write_bytes(b"payload")
        return {"ok": True}

    recipe = _recipe_json(tmp_path)
    first = jobs.run_stage("mine", fn, "r1", str(tmp_path), recipe)
    inode = (Path(first["dir"]) / "x.bin").stat().st_ino
    second = jobs.run_stage("mine", fn, "r1", str(tmp_path), recipe)
    assert len(calls) == 1 and not first["reused"] and second["reused"]
    assert second["result"] == {"ok": True, "disk_bytes": 7, "run_disk_bytes": 7}
    assert second["files"] == ["x.bin"]
    assert (Path(second["dir"]) / "x.bin").stat().st_ino == inode
    assert sorted(p.name for p in Path(first["dir"]).parent.iterdir()) == ["mine"]


def test_run_stage_turns_patchd_errors_into_stage_errors(tmp_path: Path) -> None:
    def fn(*, out: Path, **_: Any) -> dict[str, Any]:
        (out / "half.bin").write_bytes(b"x")
        raise IntegrityError("weights changed")

    with pytest.raises(StageError, match=r"^train: weights changed$"):
        jobs.run_stage("train", fn, "r1", str(tmp_path), _recipe_json(tmp_path))
    assert not artifacts.run_dir(tmp_path, "r1").joinpath("train").exists()
    assert not list(artifacts.run_dir(tmp_path, "r1").glob(".tmp-*"))


def _translated(n: int = 400) -> tuple[torch.Tensor, Augmentation]:
    """Training images (8-bit values) and a CycleGAN-like pair: half the rows translated."""
    torch.manual_seed(0)
    base = torch.randint(0, 256, (n, 3, 28, 28)).float() / 255.0
    f, g = base.clone(), base.clone()
    f[: n // 2] = torch.rand(n // 2, 3, 28, 28)
    g[n // 4 :] = torch.rand(n - n // 4, 3, 28, 28)
    return base, Augmentation(kind="cyclegan", paired={"F": f, "G": g})


def test_augmentation_stores_only_translated_rows_compactly(tmp_path: Path) -> None:
    base, aug = _translated()
    path = tmp_path / "augmentation.safetensors"
    artifacts.save_augmentation(aug, path, base, "uint8")
    full_float32 = 2 * base.numel() * 4
    assert path.stat().st_size < full_float32 / 5  # uint8 rows only: 3/8 of the rows, 1/4 size
    got = artifacts.load_augmentation(path, base)
    for key in ("F", "G"):
        same = (aug.paired[key] == base).reshape(len(base), -1).all(1)
        assert torch.equal(got.paired[key][same], base[same])  # untranslated rows: bit for bit
        assert (got.paired[key] - aug.paired[key]).abs().max() <= 0.5 / 255 + 1e-7
    exact = tmp_path / "exact.safetensors"
    artifacts.save_augmentation(aug, exact, base, "float32")
    assert exact.stat().st_size < path.stat().st_size * 5
    back = artifacts.load_augmentation(exact, base)
    assert all(torch.equal(back.paired[k], aug.paired[k]) for k in ("F", "G"))
    with pytest.raises(IntegrityError, match="pass the training images"):
        artifacts.load_augmentation(path)


def test_imageset_of_8bit_images_is_stored_as_uint8_losslessly(tmp_path: Path) -> None:
    base, _ = _translated(200)
    data = ImageSet(
        base,
        torch.zeros(200, dtype=torch.int64),
        torch.zeros(200, dtype=torch.int64),
        ("a", "b"),
        ("g",),
        tuple(f"i{i}" for i in range(200)),
    )
    artifacts.save_imageset(data, tmp_path / "train.safetensors")
    assert (tmp_path / "train.safetensors").stat().st_size < base.numel() * 4 / 3
    assert torch.equal(artifacts.load_imageset(tmp_path / "train.safetensors").x, base)
    floats = _imageset()  # torch.rand: not 8-bit values, kept as float32
    artifacts.save_imageset(floats, tmp_path / "f.safetensors")
    assert torch.equal(artifacts.load_imageset(tmp_path / "f.safetensors").x, floats.x)


def test_a_stage_past_the_run_disk_bound_fails_naming_stage_and_size(tmp_path: Path) -> None:
    config = build_config({"state_dir": str(tmp_path), "artifacts": {"max_run_disk_mb": 0.5}})
    recipe = build_recipe(
        config, (tmp_path / "w.safetensors", "0" * 64, "config"), tmp_path / "slice.jsonl", 0
    ).to_json()

    def small(*, out: Path, **_: Any) -> dict[str, Any]:
        (out / "a.bin").write_bytes(b"x" * 100_000)
        return {}

    def big(*, out: Path, **_: Any) -> dict[str, Any]:
        (out / "b.bin").write_bytes(b"x" * 600_000)
        return {}

    done = jobs.run_stage("collect", small, "r1", str(tmp_path), recipe)
    assert done["result"]["disk_bytes"] == 100_000 and done["result"]["run_disk_bytes"] >= 100_000
    with pytest.raises(StageError, match=r"mine: run r1 would take 0\.7 MB .*0\.6 MB \(mine\)"):
        jobs.run_stage("mine", big, "r1", str(tmp_path), recipe)
    assert not (tmp_path / "runs" / "r1" / "mine").exists()

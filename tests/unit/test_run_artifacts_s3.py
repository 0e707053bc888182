"""Run artifacts in a bucket on a real S3-API server (moto, a process): a stage published on one
machine is fetched and verified on another; unpublished or changed objects are never used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patchd.config import build_config
from patchd.exceptions import IntegrityError, NotFoundError
from patchd.runs.artifacts import MANIFEST, RunArtifacts, StageManifest, verify
from patchd.workers import artifacts as build


def _machine(s3: dict[str, object], cache: Path) -> RunArtifacts:
    section = {"root": f"{s3['url']}/art", "cache_dir": str(cache)}
    config = build_config({"artifacts": {**section, "storage_options": s3["storage_options"]}})
    store = RunArtifacts.from_config(config)
    assert store.blobs is not None and store.location == f"{s3['url']}/art"
    return store


def _build_stage(store: RunArtifacts, run_id: str, stage: str, files: dict[str, bytes]) -> None:
    final = store.stage_dir(run_id, stage)
    with build.building(final) as tmp:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        build.publish(tmp, final, run_id, {"n": len(files)})


@pytest.fixture
def machines(s3_bucket: dict[str, object], tmp_path: Path) -> tuple[RunArtifacts, RunArtifacts]:
    return _machine(s3_bucket, tmp_path / "a"), _machine(s3_bucket, tmp_path / "b")


FILES = {"mining.json": b'{"k": 1}', "previews/p0.png": b"\x89PNG...", "groups.safetensors": b"t"}


def test_a_stage_published_on_one_machine_is_fetched_and_verified_on_another(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    _build_stage(a, "r1", "mine", FILES)
    assert b.manifest("r1", "mine") is None  # built, not yet published
    published = a.publish_stage("r1", "mine")
    assert a.blobs is not None
    attempt = published.attempt
    assert attempt  # the files went up under one attempt, the manifest beside them names it
    expected = [f"runs/r1/mine/{attempt}/{n}" for n in FILES] + [f"runs/r1/mine/{MANIFEST}"]
    assert a.blobs.list("runs/r1/mine") == sorted(expected)
    fetched = b.fetch("r1", "mine")
    assert fetched == published and fetched.result == {"n": 3}
    assert verify(b.stage_dir("r1", "mine")) == published
    assert (b.stage_dir("r1", "mine") / "previews" / "p0.png").read_bytes() == b"\x89PNG..."


def test_a_reader_fetches_only_the_files_it_names_or_the_small_ones(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    _build_stage(a, "r1", "mine", FILES)
    a.publish_stage("r1", "mine")
    b.fetch_small("r1", ["mine", "train"])  # train is not published: skipped
    names = {p.name for p in b.stage_dir("r1", "mine").rglob("*") if p.is_file()}
    assert names == {"mining.json", "p0.png", MANIFEST}
    with pytest.raises(NotFoundError, match="nope.json"):
        b.fetch("r1", "mine", ["nope.json"])


def test_an_object_changed_after_publication_is_refused_and_removed(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    _build_stage(a, "r1", "mine", FILES)
    attempt = a.publish_stage("r1", "mine").attempt
    assert a.blobs is not None
    a.blobs.put(f"runs/r1/mine/{attempt}/mining.json", b'{"k": 2}')
    with pytest.raises(IntegrityError, match="changed after publication"):
        b.fetch("r1", "mine", ["mining.json"])
    assert not (b.stage_dir("r1", "mine") / "mining.json").exists()


def test_two_attempts_of_a_stage_publish_once_and_the_loser_takes_the_winners(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    _build_stage(a, "r1", "train", {"model.safetensors": b"first"})
    _build_stage(b, "r1", "train", {"model.safetensors": b"second"})
    first = a.publish_stage("r1", "train")
    kept = b.publish_stage("r1", "train")  # create-only manifest: b lost the race
    assert kept == first
    assert a.blobs is not None
    theirs = StageManifest.from_json(a.blobs.get("runs/r1/train/manifest.json").data)
    assert theirs == first
    assert (b.stage_dir("r1", "train") / "model.safetensors").read_bytes() == b"first"
    assert a.blobs.list("runs/r1/train") == sorted(  # the loser's upload is gone
        [f"runs/r1/train/{first.attempt}/model.safetensors", "runs/r1/train/manifest.json"]
    )


def test_a_file_serve_wrote_is_checked_against_the_recipe_digest(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    a.run_dir("r1").mkdir(parents=True)
    (a.run_dir("r1") / "slice.jsonl").write_text(json.dumps({"id": "e1"}) + "\n")
    a.publish_file("r1", "slice.jsonl")
    from patchd.digests import sha256_file

    digest = sha256_file(a.run_dir("r1") / "slice.jsonl")
    assert b.fetch_file("r1", "slice.jsonl", digest) == b.run_dir("r1") / "slice.jsonl"
    with pytest.raises(IntegrityError, match="recipe"):
        b.fetch_file("r1", "slice.jsonl", "0" * 64)
    assert b.fetch_file("r1", "regions/labels.json") is None


@pytest.mark.parametrize("run_id", ["", "..", "../x", "a/../../b", ".hidden", "a\\b"])
def test_a_run_id_is_a_plain_name_never_a_path(tmp_path: Path, run_id: str) -> None:
    from patchd.exceptions import ValidationError

    with pytest.raises(ValidationError, match="not a plain run id"):
        RunArtifacts(tmp_path).run_dir(run_id)


def test_region_labels_given_on_one_machine_reach_serve_and_the_train_stage(
    s3_bucket: dict[str, object], tmp_path: Path
) -> None:
    from patchd.runs import regions

    worker, cli, trainer = (_machine(s3_bucket, tmp_path / n) for n in ("w", "cli", "t"))
    body = {"regions": [{"region": 0, "source": 1, "weight": 0.5}]}
    _build_stage(worker, "r1", "synthesize", {"regions.json": json.dumps(body).encode()})
    worker.publish_stage("r1", "synthesize")
    cli.fetch_regions("r1")  # the person's machine: regions from the bucket
    run = cli.run_dir("r1")
    regions.set_labels(run, {"0": "b"}, "ana", ["a", "b"])
    cli.publish_labels("r1")
    trainer.fetch_regions("r1")
    given = regions.read_labels(regions.labels_path(trainer.run_dir("r1")))
    assert given.labels == {0: "b"} and given.given_by == {0: "ana"}


def test_a_full_fetch_drops_files_no_manifest_vouches_for(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    _build_stage(a, "r1", "mine", FILES)
    a.publish_stage("r1", "mine")
    stray = b.stage_dir("r1", "mine") / "half-written.bin"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"from an attempt that died")
    b.fetch("r1", "mine")
    assert not stray.exists()
    verify(b.stage_dir("r1", "mine"))


def test_a_manifest_naming_another_stage_is_refused(
    machines: tuple[RunArtifacts, RunArtifacts],
) -> None:
    a, b = machines
    _build_stage(a, "r1", "mine", FILES)
    published = a.publish_stage("r1", "mine")
    assert a.blobs is not None
    a.blobs.put("runs/r1/evaluate/manifest.json", published.to_json().encode())  # copied over
    with pytest.raises(IntegrityError, match="names r1/mine"):
        b.fetch("r1", "evaluate")

"""The registry in a bucket on a real S3-API server (moto, a process): two machines, no shared
filesystem (each has its own cache), compare-and-swap pointer switches, verified fetches."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from patchd.config import StorageOptions
from patchd.exceptions import ConflictError, IntegrityError, NotFoundError
from patchd.promotion.registry import Pointer, Registry, VersionManifest
from patchd.store.blobs import open_blobs
from tests.gate_support import write_weights


def _machine(bucket: dict[str, object], cache: Path) -> Registry:
    options = StorageOptions.model_validate(bucket["storage_options"])
    return Registry(cache, open_blobs(f"{bucket['url']}/registry", options))


@pytest.fixture
def machines(s3_bucket: dict[str, object], tmp_path: Path) -> tuple[Registry, Registry]:
    return _machine(s3_bucket, tmp_path / "cache-a"), _machine(s3_bucket, tmp_path / "cache-b")


def _publish(reg: Registry, tmp: Path, seed: float) -> str:
    path = tmp / f"w{seed}.safetensors"
    sha = write_weights(path, seed)
    manifest = VersionManifest(model="m", sha256=sha, run_id=f"r{seed}")
    reg.publish("m", path, manifest, {"report.json": b'{"ok": true}'})
    return sha


def test_a_version_published_on_one_machine_is_fetched_and_verified_on_another(
    machines: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = machines
    sha = _publish(a, tmp_path, 1.0)
    assert b.models() == ["m"]
    version = b.get("m", sha)
    assert version.path.is_relative_to(tmp_path / "cache-b")
    version.verify()
    assert (version.path / "report.json").read_bytes() == b'{"ok": true}'
    assert [v.sha256 for v in b.versions("m")] == [sha]
    b.promote("m", sha, "bob", expect=None)
    assert a.production("m").sha256 == sha  # machine a reads the pointer from the bucket


def test_promote_and_rollback_are_compare_and_swap_on_the_bucket(
    machines: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = machines
    first, second = _publish(a, tmp_path, 1.0), _publish(a, tmp_path, 2.0)
    a.promote("m", first, "alice", expect=None)
    b.promote("m", second, "bob", expect=first)
    with pytest.raises(ConflictError, match="changed meanwhile"):
        a.promote("m", first, "alice", expect=first)  # a's view is stale
    back = a.rollback("m", "carol", expect=second)
    assert (back.sha256, back.action, b.pointer("m").sha256) == (first, "rollback", first)
    with pytest.raises(ConflictError, match="no previous"):
        b.rollback("m", "carol")


def test_two_machines_racing_to_switch_the_pointer_one_wins_and_it_is_whole(
    s3_bucket: dict[str, object], tmp_path: Path
) -> None:
    seeder = _machine(s3_bucket, tmp_path / "seed")
    base = _publish(seeder, tmp_path, 0.5)
    seeder.promote("m", base, "setup")
    racers = [_machine(s3_bucket, tmp_path / f"cache-{i}") for i in range(6)]
    shas = [_publish(r, tmp_path, 1.0 + i) for i, r in enumerate(racers)]
    for r, sha in zip(racers, shas, strict=True):
        r.get("m", sha)  # fetched and verified before the race: the race is the pointer alone
    barrier = threading.Barrier(len(racers))
    won: list[str] = []
    lost: list[str] = []

    def promote(reg: Registry, sha: str) -> None:
        # each reads the pointer, then puts If-Match its etag: the in-between is the race
        barrier.wait()
        try:
            won.append(reg.promote("m", sha, "racer").sha256)
        except ConflictError as err:
            lost.append(str(err))

    threads = [threading.Thread(target=promote, args=p) for p in zip(racers, shas, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pointer = seeder.pointer("m")
    assert len(won) >= 1 and len(won) + len(lost) == len(racers)
    assert pointer is not None and pointer.sha256 in shas
    assert all("changed meanwhile" in m or "already in production" in m for m in lost)
    # every winner after the first read the winner's pointer: the chain has no lost update
    assert pointer.previous in (base, *won)


def test_an_older_leader_epoch_cannot_switch_the_bucket_pointer(
    machines: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = machines
    first, second = _publish(a, tmp_path, 1.0), _publish(a, tmp_path, 2.0)
    assert a.promote("m", first, "leader-5", epoch=5).epoch == 5
    with pytest.raises(ConflictError, match="epoch 3 is older"):
        b.promote("m", second, "ex-leader", epoch=3)
    with pytest.raises(ConflictError, match="epoch 3 is older"):
        b.rollback("m", "ex-leader", epoch=3)
    assert b.pointer("m") == a.pointer("m") and b.pointer("m").sha256 == first


def test_an_object_changed_in_the_bucket_is_refused_on_fetch(
    s3_bucket: dict[str, object], machines: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = machines
    sha = _publish(a, tmp_path, 1.0)
    assert a.blobs is not None
    a.blobs.put(f"m/versions/{sha}/model.safetensors", b"not the weights")
    with pytest.raises(IntegrityError, match="changed after publication"):
        b.get("m", sha)
    assert not (tmp_path / "cache-b" / "m" / "versions" / sha).exists()
    with pytest.raises(NotFoundError, match="model version"):
        b.get("m", "0" * 64)


def test_gc_deletes_old_versions_from_the_bucket(
    machines: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = machines
    shas = [_publish(a, tmp_path, float(i)) for i in range(4)]
    b.promote("m", shas[0], "alice")
    removed = b.gc("m", keep=1)
    assert sorted(removed) == sorted(shas[1:3])
    assert {v.sha256 for v in a.versions("m")} == {shas[0], shas[3]}
    assert a.blobs is not None
    assert Pointer.from_json(a.blobs.get("m/production.json").data).sha256 == shas[0]


def test_a_rewritten_report_is_fetched_again_and_the_weights_are_not(
    machines: tuple[Registry, Registry], tmp_path: Path
) -> None:
    a, b = machines
    sha = _publish(a, tmp_path, 1.0)
    first = b.get("m", sha)
    assert a.blobs is not None
    a.write_files("m", sha, {"report.json": b'{"ok": false}'})
    a.blobs.delete(f"m/versions/{sha}/model.safetensors")  # b must reuse its checked copy
    again = b.get("m", sha)
    assert (again.path / "report.json").read_bytes() == b'{"ok": false}'
    assert again.manifest.files["report.json"] != first.manifest.files["report.json"]
    again.verify()

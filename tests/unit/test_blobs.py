"""Blob stores: a local directory and a bucket on a real S3-API server (moto, a process)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from patchd.config import StorageOptions
from patchd.exceptions import ConfigError, ConflictError, NotFoundError, ValidationError
from patchd.store.blobs import BlobStore, LocalBlobs, S3Blobs, open_blobs


@pytest.fixture(params=["local", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "local":
        return open_blobs(tmp_path / "blobs")
    bucket = request.getfixturevalue("s3_bucket")
    options = StorageOptions.model_validate(bucket["storage_options"])
    return open_blobs(f"{bucket['url']}/some/prefix", options)


def test_put_get_list_delete_round_trip(blobs: BlobStore, tmp_path: Path) -> None:
    etag = blobs.put("runs/r1/a.json", b'{"a": 1}')
    assert blobs.get("runs/r1/a.json").data == b'{"a": 1}'
    assert blobs.get("runs/r1/a.json").etag == etag == blobs.etag("runs/r1/a.json")
    src = tmp_path / "w.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    blobs.put_file("runs/r1/sub/w.bin", src)
    blobs.get_file("runs/r1/sub/w.bin", tmp_path / "out" / "w.bin")
    assert (tmp_path / "out" / "w.bin").read_bytes() == src.read_bytes()
    assert blobs.list("runs/r1") == ["runs/r1/a.json", "runs/r1/sub/w.bin"]
    assert blobs.list("runs/r") == []  # a prefix is a folder, not a string prefix
    assert blobs.folders("") == ["runs"] and blobs.folders("runs/r1") == ["sub"]
    blobs.delete("runs/r1/a.json")
    blobs.delete("runs/r1/a.json")  # absent is fine
    assert blobs.etag("runs/r1/a.json") is None
    with pytest.raises(NotFoundError, match="a.json"):
        blobs.get("runs/r1/a.json")
    with pytest.raises(NotFoundError):
        blobs.get_file("runs/r1/a.json", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_create_only_put_refuses_an_existing_key(blobs: BlobStore) -> None:
    blobs.put("p.json", b"1", if_none_match=True)
    with pytest.raises(ConflictError, match="p.json"):
        blobs.put("p.json", b"2", if_none_match=True)
    assert blobs.get("p.json").data == b"1"


def test_compare_and_swap_put_needs_the_current_etag(blobs: BlobStore) -> None:
    first = blobs.put("p.json", b"1")
    second = blobs.put("p.json", b"2", if_match=first)
    with pytest.raises(ConflictError, match="p.json"):
        blobs.put("p.json", b"3", if_match=first)  # stale etag
    assert blobs.get("p.json").data == b"2"
    blobs.put("p.json", b"4", if_match=second)
    assert blobs.get("p.json").data == b"4"


def test_two_writers_swapping_from_the_same_etag_one_wins(blobs: BlobStore) -> None:
    start = blobs.put("pointer.json", b"v0")
    barrier = threading.Barrier(8)
    won: list[bytes] = []
    lost: list[str] = []

    def writer(i: int) -> None:
        body = f"v1-writer{i}".encode()
        barrier.wait()
        try:
            blobs.put("pointer.json", body, if_match=start)
            won.append(body)
        except ConflictError as err:
            lost.append(str(err))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert blobs.get("pointer.json").data == won[0]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_a_bad_key_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValidationError, match="blob key"):
        LocalBlobs(tmp_path).put(key, b"x")


@pytest.mark.parametrize("url", ["s3://", "s3://bucket?x=1", "s3://k:s@bucket/p"])
def test_a_bad_bucket_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        S3Blobs.open(url, None)


def test_local_listing_skips_temp_and_lock_files(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path)
    blobs.put("a/b.json", b"1", if_none_match=True)  # takes the lock file
    (tmp_path / "a" / ".tmp-b.json-x").write_bytes(b"half")
    assert blobs.list("") == ["a/b.json"]


class _IgnoresConditions(S3Blobs):
    """A server that accepts If-None-Match / If-Match and ignores them (some S3 look-alikes)."""

    def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        return super().put(key, data)


def test_a_bucket_that_ignores_conditional_writes_is_refused(s3_bucket: dict[str, object]) -> None:
    options = StorageOptions.model_validate(s3_bucket["storage_options"])
    real = S3Blobs.open(f"{s3_bucket['url']}/checked", options)  # moto enforces them: accepted
    lax = _IgnoresConditions(real.fs, real.bucket, "unchecked")
    with pytest.raises(ConfigError, match="does not enforce conditional writes"):
        lax.check_conditional_writes()
    assert real.list("") == [] and lax.list("") == []  # the probe key is gone either way

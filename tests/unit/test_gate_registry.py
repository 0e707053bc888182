"""Registry: publication, pointer CAS, rollback, gc, and SIGKILL crash safety."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from patchd.exceptions import ConflictError, IntegrityError, NotFoundError, ValidationError
from patchd.promotion.registry import Pointer, Registry, VersionManifest
from tests.gate_support import write_weights


def _publish(reg: Registry, tmp: Path, seed: float, parent: str | None = None) -> str:
    sha = write_weights(tmp / f"w{seed}.safetensors", seed)
    manifest = VersionManifest(
        model="m",
        sha256=sha,
        parent=parent,
        run_id=f"r{seed}",
        recipe={"trainer": "gdro"},
        data_digests={"train": "ab" * 32},
    )
    v = reg.publish("m", tmp / f"w{seed}.safetensors", manifest, {"report.json": b"{}"})
    assert v.sha256 == sha
    return sha


def test_publish_is_complete_and_idempotent(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    sha = _publish(reg, tmp_path, 1.0)
    v = reg.get("m", sha)
    v.verify()
    assert v.manifest.schema == 1 and v.manifest.recipe == {"trainer": "gdro"}
    assert set(v.manifest.files) == {"model.safetensors", "report.json"}
    assert _publish(reg, tmp_path, 1.0) == sha  # same bytes again: a no-op
    assert [p.name for p in (tmp_path / "reg" / "m" / "versions").iterdir()] == [sha]


def test_promote_rollback_and_cas(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    assert reg.production("m") is None
    a = reg.import_model("m", _w(tmp_path, 1.0), "alice").sha256
    b = _publish(reg, tmp_path, 2.0, parent=a)
    with pytest.raises(ConflictError, match="changed meanwhile"):
        reg.promote("m", b, "bob", expect="0" * 64)
    p = reg.promote("m", b, "bob", expect=a)
    assert (p.sha256, p.previous, p.approved_by) == (b, a, "bob")
    assert reg.production("m").sha256 == b
    with pytest.raises(ConflictError, match="already in production"):
        reg.promote("m", b, "bob")
    back = reg.rollback("m", "carol", expect=b)
    assert (back.sha256, back.previous, back.action) == (a, None, "rollback")
    with pytest.raises(ConflictError, match="no previous"):
        reg.rollback("m", "carol")


def _w(tmp: Path, seed: float) -> Path:
    path = tmp / f"import{seed}.safetensors"
    write_weights(path, seed)
    return path


def test_production_verifies_sha256(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    v = reg.import_model("m", _w(tmp_path, 1.0), "alice")
    with open(v.weights_path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x00")
    with pytest.raises(IntegrityError, match="changed after publication"):
        reg.production("m")
    assert reg.production("m", verify=False).sha256 == v.sha256


def test_bad_names_and_unknown_versions(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ValidationError):
        reg.version_dir("../etc", "a" * 64)
    with pytest.raises(ValidationError):
        reg.version_dir("m", "../../x")
    with pytest.raises(NotFoundError):
        reg.promote("m", "a" * 64, "x")
    with pytest.raises(NotFoundError):
        reg.import_model("m", tmp_path / "missing.safetensors", "x")


def test_gc_keeps_production_previous_and_protected(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    shas = [_publish(reg, tmp_path, float(i)) for i in range(6)]
    reg.promote("m", shas[0], "a")
    reg.promote("m", shas[1], "a")  # production 1, previous 0
    (reg.model_dir("m") / "versions" / ".tmp-leftover").mkdir()
    removed = reg.gc("m", keep=1, protect={shas[2]})
    left = {v.sha256 for v in reg.versions("m")}
    assert {shas[0], shas[1], shas[2], shas[5]} <= left
    assert set(removed) == {shas[3], shas[4]}
    assert not list((reg.model_dir("m") / "versions").glob(".tmp-*"))


def test_readers_never_see_a_partial_pointer(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    a = reg.import_model("m", _w(tmp_path, 1.0), "a").sha256
    b = _publish(reg, tmp_path, 2.0)
    stop = threading.Event()
    seen: set[str] = set()

    def flip() -> None:
        while not stop.is_set():
            cur = reg.pointer("m")
            reg.promote("m", b if cur.sha256 == a else a, "flipper")

    thread = threading.Thread(target=flip)
    thread.start()
    try:
        for _ in range(2000):
            seen.add(Pointer.from_json(reg.pointer_path("m").read_bytes()).sha256)
    finally:
        stop.set()
        thread.join()
    assert seen <= {a, b} and len(seen) == 2


def _child_loop(root: Path, work: Path, out: int) -> None:
    """Publish + promote fresh small versions forever, announcing each digest first."""
    from patchd.promotion.registry import sha256_file

    reg = Registry(root)
    work.mkdir(exist_ok=True)
    i = 0
    while True:
        w = work / f"w{os.getpid()}-{i}.safetensors"
        w.write_bytes(os.urandom(4096 + 512 * (i % 7)))
        sha = sha256_file(w)
        os.write(out, (sha + "\n").encode())
        reg.publish(
            "m",
            w,
            VersionManifest(model="m", sha256=sha, run_id=str(i)),
            {"report.html": b"<html>" * 200},
        )
        cur = reg.pointer("m")
        reg.promote("m", sha, "crash-test", expect=cur.sha256 if cur else None)
        i += 1


def _spawn(root: Path, work: Path) -> tuple[int, int]:
    """Fork a child running :func:`_child_loop` (fork, not exec: 200 runs stay fast)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            _child_loop(root, work, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    return pid, read_fd


def _drain(fd: int) -> set[str]:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return set(b"".join(chunks).decode().split())


@pytest.mark.slow
def test_sigkill_during_publication_and_pointer_switch(tmp_path: Path) -> None:
    """>= 200 SIGKILLs at random points; the pointer always names a complete, verifiable model
    (the old one or one the killed process was publishing/promoting)."""
    reg = Registry(tmp_path / "reg")
    reg.import_model("m", _w(tmp_path, 0.0), "setup")
    rng = random.Random(7)
    kills, switched, started = 0, 0, time.monotonic()
    while kills < 200:
        old = reg.pointer("m").sha256
        pid, fd = _spawn(reg.root, tmp_path / "w")
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        announced = _drain(fd)
        kills += 1
        version = reg.production("m")  # verifies the weights' sha256 and parses the manifest
        assert version.sha256 in announced | {old}
        version.verify()
        switched += version.sha256 != old
        for v in reg.versions("m"):  # every visible version is complete
            v.verify()
    reg.gc("m", keep=2)
    print(
        f"crash test: {kills} SIGKILLs, pointer moved in {switched}, "
        f"{time.monotonic() - started:.1f}s"
    )
    assert switched > 20  # the kills really landed inside the publish/promote loop
    assert 0 < switched < kills  # ... and also before a switch completed

"""Mined pseudo-groups: projection and assignment, the JSON artifact (round trip, hostile files),
the group codes the window gives events, and the serve-side choice of the newest run's file
(real SQLite store, real files, real event bus)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CollectorRegistry

from patchd.config import build_config
from patchd.digests import sha256_file
from patchd.domain import EventBus, RunFinished
from patchd.exceptions import ValidationError
from patchd.monitor import mined as minedmod
from patchd.monitor.component import MonitorComponent
from patchd.monitor.groups import GroupSpace
from patchd.monitor.mined import MEMBER, REST, UNKNOWN, MinedDirection, MinedGroups
from patchd.monitor.mined_source import resolve
from patchd.monitor.window import GroupIndex
from patchd.runs.records import RunRecord, insert_run
from patchd.services import Services
from patchd.store.db import Store
from tests.unit.monitor_helpers import CLASSES, monitor_config

DIM = 4
DIGEST = "a" * 64


def groups(threshold: float = 0.5, *, run_id: str = "run-1", digest: str = DIGEST) -> MinedGroups:
    """Class "a" (0) has a direction along +x0 after standardising with mean 1, std 2."""
    coef = np.array([4.0, 0.0, 0.0, 0.0])
    direction = MinedDirection(0, "a", coef, -1.0, threshold, 0.9, "a: looks like 'sticker=yes'")
    mean, std = np.ones(DIM), np.full(DIM, 2.0)
    return MinedGroups("m", run_id, digest, "classifier-features", mean, std, (direction,))


def embed(x0: float) -> np.ndarray:
    """A raw embedding whose preprocessed first coordinate has the sign of ``x0``."""
    return np.array([1.0 + 2.0 * x0, 1.0 + 2.0 * 0.3, 1.0, 1.0])


def test_assignment_follows_the_sign_the_preprocessing_and_the_threshold() -> None:
    mined = groups(threshold=0.5)
    # z = w / |w| with w = (x - 1) / 2; log-odds = 4 z0 - 1, member above 0.5 (z0 > 0.375)
    x = np.stack([embed(3.0), embed(0.1), embed(-3.0), embed(0.2)])
    z0 = np.array(
        [
            3.0 / np.hypot(3.0, 0.3),
            0.1 / np.hypot(0.1, 0.3),
            -3.0 / np.hypot(3.0, 0.3),
            0.2 / np.hypot(0.2, 0.3),
        ]
    )
    np.testing.assert_allclose(mined.decision(x, np.zeros(4, np.int64)), 4 * z0 - 1)
    # row 3: log-odds 4 * 0.555 - 1 = 1.22 > 0.5 -> member; row 1: 0.26 > 0 but < 0.5 -> rest
    values = mined.assign(x, np.array([0, 0, 0, 0]))
    assert list(values) == [MEMBER, REST, REST, MEMBER]
    assert list(mined.assign(x, np.array([1, 1, 1, 1]))) == [UNKNOWN] * 4  # class b: not mined


def test_round_trip_keeps_every_number_and_the_readable_description(tmp_path: Path) -> None:
    mined = groups()
    path = mined.write(tmp_path / minedmod.FILE)
    back = minedmod.read(path, CLASSES)
    assert back.source == str(path) and back.dim == DIM
    np.testing.assert_array_equal(back.mean, mined.mean)
    np.testing.assert_array_equal(back.std, mined.std)
    (d,) = back.directions
    np.testing.assert_array_equal(d.coef, mined.directions[0].coef)
    assert (d.intercept, d.threshold, d.confidence) == (-1.0, 0.5, 0.9)
    assert back.descriptions() == (
        "class a, mined failure mode: looks like 'sticker=yes' (confidence 0.90)",
    )
    x = np.stack([embed(v) for v in np.linspace(-2, 2, 9)])
    cls = np.zeros(9, np.int64)
    assert list(back.assign(x, cls)) == list(mined.assign(x, cls))


def _hostile(tmp_path: Path, edit) -> Path:  # noqa: ANN001
    doc = groups().to_json()
    edit(doc)
    path = tmp_path / minedmod.FILE
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda d: d["classes"][0].__setitem__("coef", [1.0, 2.0]), "classes[0].coef"),
        (lambda d: d["preprocess"].__setitem__("mean", [0.0] * 5), "preprocess.mean"),
        (lambda d: d["preprocess"]["std"].__setitem__(1, 0.0), "preprocess.std"),
        (lambda d: d["classes"][0].__setitem__("class", 7), "classes[0].class"),
        (lambda d: d["classes"][0].__setitem__("name", "shirt"), "classes[0].name"),
        (lambda d: d["classes"][0].__setitem__("intercept", "1"), "classes[0].intercept"),
        (lambda d: d["classes"][0].__setitem__("confidence", 1.5), "classes[0].confidence"),
        (lambda d: d.__setitem__("embedding_dim", 0), "embedding_dim"),
        (lambda d: d.__setitem__("schema", 9), "schema"),
        (lambda d: d.__setitem__("classes", [d["classes"][0]] * 2), "classes"),
        (lambda d: d.pop("incumbent_sha256"), "incumbent_sha256"),
    ],
)
def test_a_hostile_file_is_refused_naming_the_file_and_the_field(
    tmp_path: Path,
    edit,  # noqa: ANN001
    field: str,
) -> None:
    path = _hostile(tmp_path, edit)
    with pytest.raises(ValidationError) as err:
        minedmod.read(path, CLASSES)
    assert str(path) in str(err.value) and f" {field} " in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"schema": 1, "x": NaN}', "NaN"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", r"\(root\) is not a JSON object"),
    ],
)
def test_non_finite_or_broken_json_is_refused(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / minedmod.FILE
    path.write_text(text)
    with pytest.raises(ValidationError, match=why):
        minedmod.read(path, CLASSES)


def test_an_overflowing_number_is_refused_as_non_finite(tmp_path: Path) -> None:
    text = json.dumps(groups().to_json()).replace('"coef": [4.0', '"coef": [1e999', 1)
    path = tmp_path / minedmod.FILE
    path.write_text(text)
    with pytest.raises(ValidationError, match=r"classes\[0\]\.coef holds a NaN or infinite"):
        minedmod.read(path, CLASSES)


def test_window_codes_carry_the_mined_value_and_count_what_is_left_unknown() -> None:
    space = GroupSpace.from_config(monitor_config().groups)
    index = GroupIndex(space, mined=groups(threshold=0.5))
    blob = lambda x0: embed(x0).astype(np.float32).tobytes()  # noqa: E731
    keys = ("site=A", "site=B", "site=A", "site=A", "site=Z")
    blobs = (blob(3.0), blob(-3.0), None, np.zeros(3, np.float32).tobytes(), blob(3.0))
    codes = index.encode_events(keys, np.array([0, 0, 0, 0, 1]), blobs, count=True)
    names = [index.names[c] for c in codes]
    assert names == [
        "site=A,mined=member",
        "site=B,mined=rest",
        "site=A,mined=unknown",
        "site=A,mined=unknown",
        "site=other,mined=unknown",
    ]
    assert index.skipped == {"no_embedding": 1, "other_width": 1, "class_not_mined": 1}
    # without configured attributes the pseudo-group is the whole key
    bare = GroupIndex(GroupSpace((), {}, "other"), mined=groups())
    assert bare.names == ["mined=member", "mined=rest", "mined=unknown"]


# --- serve side: the newest succeeded run's file, switched when a new run succeeds ----------


def _run(store: Store, run_id: str, updated: float, digest: str = DIGEST) -> None:
    rec = RunRecord(
        run_id, "m", "succeeded", None, "test", {"incumbent_sha256": digest}, {}, {}, None,
        {}, updated, updated,
    )  # fmt: skip
    with store.write() as conn:
        insert_run(conn, rec)


def _publish(root: Path, mined: MinedGroups, tamper: bool = False) -> Path:
    stage = root / "runs" / mined.run_id / "mine"
    stage.mkdir(parents=True)
    path = mined.write(stage / minedmod.FILE)
    files = {path.name: "0" * 64 if tamper else sha256_file(path)}
    (stage / "manifest.json").write_text(json.dumps({"files": files}))
    return path


def _insert(store: Store, n: int, start: int, pred_wrong_member: bool) -> None:
    rng = np.random.default_rng(start)
    rows, now = [], time.time()
    for i in range(n):
        y, member = int(rng.integers(0, 2)), bool(rng.random() < 0.3)
        x0 = 2.0 if member else -2.0
        pred = 1 - y if (member and y == 0 and pred_wrong_member) else y
        emb = embed(x0).astype(np.float32).tobytes()
        rows.append(("m", f"r{start + i}", now, pred, 0.8, "site=A", "{}", emb, "t", now, y, now))
    with store.write() as conn:
        conn.executemany(
            "INSERT INTO predictions (model, id, ts, pred, confidence, group_key, groups, "
            "embedding, source, ingested_at, label, labeled_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )


@pytest.fixture
def served(tmp_path: Path) -> tuple[Services, MonitorComponent]:
    config = build_config(
        {
            "model": {"name": "m", "class_names": CLASSES},
            "groups": {"attributes": ["site"], "values": {"site": ["A", "B", "C"]}},
            "monitor": {"cooldown_s": 0, "reference_window": 500, "window": 10_000},
            "artifacts": {"root": str(tmp_path / "artifacts")},
        }
    )
    store = Store.open(tmp_path / "s.db")
    services = Services(
        config, store, EventBus(), CollectorRegistry(), BackgroundScheduler(), "redis://x"
    )
    comp = MonitorComponent(services)
    comp.start()
    yield services, comp
    store.close()


def test_latest_uses_the_newest_verified_run_and_switches_when_a_run_succeeds(served) -> None:  # noqa: ANN001
    services, comp = served
    root = services.config.artifacts_root
    _publish(root, groups(run_id="run-old"))
    _run(services.store, "run-old", 1.0)
    _run(services.store, "run-other-model", 3.0, digest="b" * 64)  # no file: skipped
    _insert(services.store, 1000, 0, pred_wrong_member=False)
    snap = comp.tick()
    assert snap.mined is not None and snap.mined.active and snap.mined.run_id == "run-old"
    member = {(c.stats.cls, c.stats.group): c.stats for c in snap.cells}[
        ("a", "site=A,mined=member")
    ]
    assert member.n > 100 and member.accuracy == 1.0

    _publish(root, groups(run_id="run-new", threshold=0.9), tamper=True)  # manifest mismatch
    _run(services.store, "run-new", 2.0)
    services.bus.publish(RunFinished(run_id="run-new", model="m", result="succeeded"))
    snap = comp.tick()
    assert snap.mined is not None and not snap.mined.active
    assert "does not match its stage manifest" in snap.mined.note
    assert all("mined=" not in c.stats.group for c in snap.cells)  # back to the plain groups

    (root / "runs" / "run-new").rename(root / "runs" / "gone")
    _publish(root, groups(run_id="run-new", threshold=0.9))
    services.bus.publish(RunFinished(run_id="run-new", model="m", result="succeeded"))
    snap = comp.tick()
    assert snap.mined is not None and snap.mined.run_id == "run-new"
    assert snap.reference.startswith(("learning", "window"))  # re-learned for the new cells
    assert snap.n == 1000  # the window was re-read under the new groups, not double counted


def test_a_file_mined_on_another_production_model_or_for_another_model_is_not_used(
    served,  # noqa: ANN001
) -> None:
    services, _ = served
    path = _publish(services.config.artifacts_root, groups(run_id="r"))
    with services.store.read() as conn:
        other = resolve(str(path), conn, Path("/unused"), "m", CLASSES, "c" * 64)
        model = resolve(str(path), conn, Path("/unused"), "m2", CLASSES, None)
        same = resolve(str(path), conn, Path("/unused"), "m", CLASSES, DIGEST)
        off = resolve("off", conn, Path("/unused"), "m", CLASSES, None)
    assert other.mined is None and "was mined on model aaaaaaaaaaaa" in other.note
    assert model.mined is None and "is for model 'm'" in model.note
    assert same.mined is not None and same.note == f"configured file {path}"
    assert off.mined is None and off.note == "off"


def test_the_common_embedding_width_is_the_most_frequent_not_the_first_rows() -> None:
    """One newest event with an odd width must not set the width of the whole traffic (the
    label-free estimate then crashed every tick on a width mismatch)."""
    from patchd.monitor import estimate as estmod
    from patchd.monitor.window import _embeddings

    rng = np.random.default_rng(0)
    good = [rng.normal(size=DIM).astype(np.float32).tobytes() for _ in range(400)]
    matrix, rows = _embeddings((np.zeros(3, np.float32).tobytes(), None, *good))
    assert matrix is not None and rows is not None
    assert matrix.shape == (400, DIM) and rows[0] == 2
    emb = np.frombuffer(b"".join(good), np.float32).reshape(-1, DIM).astype(np.float64)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.9, y, 1 - y)
    fitted = estmod.Estimator.fit(pred, y, np.full(400, 0.8), np.zeros(400, np.int64), emb, 2)
    assert fitted.basis is not None
    feats = fitted.features(np.full(5, 0.8), np.zeros((5, 3)))  # another width: no projection
    assert feats.shape == (5, 1 + fitted.basis.shape[1]) and (feats[:, 1:] == 0).all()


def test_config_keeps_the_keywords_and_rebases_a_relative_file_on_the_config_dir() -> None:
    base = Path("/etc/patchd")
    assert build_config({}).monitor.mined_groups == "latest"
    for word in ("latest", "off"):
        got = build_config({"monitor": {"mined_groups": word}}, base_dir=base)
        assert got.monitor.mined_groups == word
    got = build_config({"monitor": {"mined_groups": "m/mined_groups.json"}}, base_dir=base)
    assert got.monitor.mined_groups == "/etc/patchd/m/mined_groups.json"


def test_a_reference_must_fit_the_groups_in_use_and_a_plain_one_survives_mined_going_off() -> None:
    """After a promotion the evaluation's reference (plain groups) is kept once the old mined
    directions are dropped (the component drops them first), and is never used for mined cells."""
    from patchd.monitor import reference as refmod
    from patchd.monitor.engine import ModelMonitor
    from patchd.monitor.reference import Learning, Reference

    cells = [{"class_name": "a", "group_name": "site=A", "n": 100, "correct": 90}]
    plain = refmod.from_evaluation("m", {"cells": cells}, 5.0)
    assert isinstance(plain, Reference)
    engine = ModelMonitor(monitor_config(), "m")
    engine.use_mined(groups(), "test")
    engine.set_reference(plain, None)  # plain cells, mined groups: learned instead
    assert isinstance(engine.reference, Learning) and engine.reference.epoch_ts == 5.0
    engine.use_mined(None, "off")
    engine.set_reference(plain, None)
    assert engine.reference is plain
    engine.use_mined(None, "off")  # no change: the reference stays
    assert engine.reference is plain

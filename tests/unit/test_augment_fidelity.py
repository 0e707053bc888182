"""Synthesis fidelity: faithful translations pass, the identity and a one-corner painter do not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from patchd.abc import StageContext
from patchd.bench.quality import exact_swap as repaint
from patchd.config import BudgetConfig, DatasetSpec, PatchConfig
from patchd.ml.data import ImageSet
from patchd.ml.datasets import load_splits
from patchd.ml.fidelity import (
    FidelityPolicy,
    FidelityReport,
    apply_policy,
    change_spread,
    class_pairs,
    measure,
    translated_view,
)
from patchd.plugins.augmenters.maskpaste import MaskPasteAugmenter

POLICY = FidelityPolicy(judge_steps=80)


@pytest.fixture(scope="module")
def digits() -> object:
    torch.set_num_threads(2)
    return load_splits(DatasetSpec(kind="colored-digits", seed=0))


@pytest.fixture(scope="module")
def swap_report(digits) -> FidelityReport:
    return measure(digits.train, exact_swap(digits.train), digits.val, POLICY)


@pytest.fixture(scope="module")
def identity_report(digits) -> FidelityReport:
    train = digits.train
    return measure(train, {"F": train.x, "G": train.x}, digits.val, POLICY)


def exact_swap(data: ImageSet) -> dict[str, torch.Tensor]:
    """The oracle translation of colored digits: the same strokes on the other background."""
    swapped = repaint(data)
    return {"F": swapped, "G": swapped}


def test_translated_view_takes_g_for_the_larger_group_and_f_for_the_other(digits) -> None:
    train = digits.train
    pairs = class_pairs(train)
    f, g = torch.zeros_like(train.x), torch.ones_like(train.x)
    view, target = translated_view(train, {"F": f, "G": g}, pairs)
    for cls, (a, b) in pairs.items():
        rows_a = (train.y == cls) & (train.g == a)
        rows_b = (train.y == cls) & (train.g == b)
        assert bool((view[rows_a] == 1).all()) and bool((target[rows_a] == b).all())
        assert bool((view[rows_b] == 0).all()) and bool((target[rows_b] == a).all())


def test_exact_swap_is_faithful_and_kept(swap_report: FidelityReport) -> None:
    report = swap_report
    assert report.measured and len(report.directions) == 4
    for d in report.directions:
        assert d.flip_rate >= 0.9 and d.tttr >= 0.9, d
        assert d.verdict == "kept", d
    assert report.dropped_classes() == {}


def test_identity_translation_fails_and_the_policy_drops_every_class(
    digits, identity_report: FidelityReport
) -> None:
    train, report = digits.train, identity_report
    for d in report.directions:
        assert d.flip_rate < 0.2 and d.tttr < 0.3, d
        assert d.verdict.startswith("dropped"), d
    assert set(report.dropped_classes()) == {0, 1}
    swapped = exact_swap(train)
    used = apply_policy(train, swapped, report)
    assert torch.equal(used["F"], train.x) and torch.equal(used["G"], train.x)


def test_a_dropped_class_keeps_the_other_classes_translations(digits) -> None:
    train = digits.train
    swapped = exact_swap(train)
    broken = {k: v.clone() for k, v in swapped.items()}
    rows = train.y == 1
    broken["F"][rows], broken["G"][rows] = train.x[rows], train.x[rows]
    report = measure(train, broken, digits.val, POLICY)
    assert set(report.dropped_classes()) == {1}
    used = apply_policy(train, broken, report)
    assert torch.equal(used["G"][~rows], swapped["G"][~rows])


def test_report_round_trips_through_json(identity_report: FidelityReport) -> None:
    report = identity_report
    again = FidelityReport.from_dict(json.loads(report.to_json()))
    assert again.dropped_classes() == report.dropped_classes()
    assert [d.flip_rate for d in again.directions] == [d.flip_rate for d in report.directions]


def test_unlabelled_reference_is_reported_unmeasured(digits) -> None:
    val = digits.val.with_groups(torch.full_like(digits.val.g, -1), ())
    report = measure(digits.train, exact_swap(digits.train), val, POLICY)
    assert not report.measured and "no subgroup labels" in report.reason
    assert report.dropped_classes() == {}


def test_a_one_corner_painter_has_a_lower_change_spread_than_random_positions() -> None:
    gen = torch.Generator().manual_seed(0)
    before = torch.rand(200, 3, 28, 28, generator=gen) * 0.2
    corner, anywhere = before.clone(), before.clone()
    corner[:, :, :5, :5] = 1.0
    for i in range(200):
        r, c = torch.randint(0, 23, (2,), generator=gen).tolist()
        anywhere[i, :, r : r + 5, c : c + 5] = 1.0
    assert change_spread(before, corner) == 0.0
    assert change_spread(before, anywhere) > 0.8


def test_maskpaste_translations_of_colored_digits_are_faithful(digits, tmp_path: Path) -> None:
    ctx = StageContext(
        run_id="t",
        stage="synthesize",
        out_dir=tmp_path,
        params=PatchConfig(
            params={"maskpaste": {"steps": 150}},
            budget=BudgetConfig(epochs=1, batch_size=64, lr=1e-3, max_minutes=5),
        ),
    )
    aug = MaskPasteAugmenter().synthesize(ctx, torch.nn.Identity(), digits.train)
    assert aug.kind == "maskpaste" and len(aug.previews) == 4
    report = measure(digits.train, aug.paired, digits.val, POLICY)
    for d in report.directions:
        assert d.flip_rate >= 0.9 and d.tttr >= 0.9, d
        assert d.verdict == "kept", d  # class kept judged with its 95% bound (4-5 minority rows)


def test_classes_with_the_same_two_groups_share_one_locator() -> None:
    from patchd.plugins.augmenters.maskpaste import locator_sets

    pairs = {0: (0, 1), 1: (1, 0), 2: (2, 0)}
    assert locator_sets(pairs, share=True) == [((0, 1), [0, 1]), ((0, 2), [2])]
    assert locator_sets(pairs, share=False) == [((0, 1), [0]), ((0, 1), [1]), ((0, 2), [2])]

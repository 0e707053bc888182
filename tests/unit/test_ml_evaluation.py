"""Evaluation reports: numbers against direct numpy, JSON roundtrip, schema errors, torch pair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from patchd.config import DatasetSpec
from patchd.evaluation import PairedEvaluation, evaluate_correct, paired
from patchd.exceptions import ValidationError
from patchd.stats import wilson_interval

torch.set_num_threads(1)
CLASSES = ("a", "b")
GROUPS = ("color=red", "color=green")


def _data(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cell = rng.integers(0, 3, size=n)  # cell 3 (b, green) stays empty
    inc = rng.random(n) < np.array([0.9, 0.3, 0.8, 0.5])[cell]
    cand = rng.random(n) < np.array([0.85, 0.7, 0.8, 0.5])[cell]
    return cell, inc, cand


def test_model_evaluation_matches_numpy() -> None:
    cell, inc, _ = _data()
    mix = np.array([0.5, 0.1, 0.3, 0.1])
    ev = evaluate_correct(inc, cell, CLASSES, GROUPS, mix, confidence=0.9, n_min=5)
    for c in range(3):
        k, n = int(inc[cell == c].sum()), int((cell == c).sum())
        r = ev.cells[c]
        assert (r.n, r.correct) == (n, k) and r.accuracy == pytest.approx(k / n)
        assert (r.ci_low, r.ci_high) == pytest.approx(wilson_interval(k, n, 0.9))
    assert ev.cells[3].n == 0 and np.isnan(ev.cells[3].accuracy)
    assert ev.cell(1, 0).group_name == "color=red" and ev.cells[1].key == "a|color=green"
    accs = [inc[cell == c].mean() for c in range(3)]
    assert ev.worst_group_accuracy == pytest.approx(min(accs)) and ev.worst_cell == (0, 1)
    assert ev.average_pooled == pytest.approx(inc.mean())
    assert ev.average_reweighted == pytest.approx((mix[:3] * accs).sum() / mix[:3].sum())


def test_worst_group_respects_n_min() -> None:
    cell = np.array([0, 0, 0, 1])
    correct = np.array([True, True, False, False])
    assert evaluate_correct(correct, cell, ("a",), GROUPS, n_min=1).worst_cell == (0, 1)
    ev = evaluate_correct(correct, cell, ("a",), GROUPS, n_min=2)
    assert ev.worst_cell == (0, 0) and ev.worst_group_accuracy == pytest.approx(2 / 3)
    assert np.isnan(evaluate_correct(correct, cell, ("a",), GROUPS, n_min=9).worst_group_accuracy)


def test_no_groups_means_one_group_per_class() -> None:
    ev = evaluate_correct(np.array([True, False]), np.array([0, 1]), CLASSES, ())
    assert [c.key for c in ev.cells] == ["a|all", "b|all"]


def test_bad_arrays_are_clear_errors() -> None:
    with pytest.raises(ValidationError, match="equal-length"):
        evaluate_correct(np.ones(3, bool), np.zeros(2, int), CLASSES, GROUPS)
    with pytest.raises(ValidationError, match=r"cell ids must lie in \[0, 4\)"):
        evaluate_correct(np.ones(1, bool), np.array([7]), CLASSES, GROUPS)
    with pytest.raises(ValidationError, match="train_mix has 2 cells"):
        evaluate_correct(np.ones(1, bool), np.array([0]), CLASSES, GROUPS, np.ones(2))


def test_paired_json_roundtrip() -> None:
    cell, inc, cand = _data(1)
    pe = paired(inc, cand, cell, CLASSES, GROUPS, ids=[f"r{i}" for i in range(len(cell))])
    text = pe.to_json()
    assert json.loads(text)["schema"] == 1 and "NaN" not in text  # strict JSON
    back = PairedEvaluation.from_json(text)
    assert np.array_equal(back.cell, cell) and back.cell.dtype == np.int64
    assert np.array_equal(back.incumbent_correct, inc) and back.candidate_correct.dtype == bool
    assert back.incumbent.cells[:3] == pe.incumbent.cells[:3]  # cell 3 is empty: NaN != NaN
    assert back.candidate.cells[:3] == pe.candidate.cells[:3]
    assert back.incumbent.worst_cell == pe.incumbent.worst_cell
    assert back.candidate.average_reweighted == pytest.approx(pe.candidate.average_reweighted)
    assert np.isnan(back.candidate.cells[3].accuracy)
    assert back.ids == pe.ids and back.train_mix == pe.train_mix
    assert back.worst_group_delta == pytest.approx(
        cand[cell == 1].mean() - min(inc[cell == c].mean() for c in range(3))
    )
    assert len(back.rows) == 4 and back.rows[1].delta == pytest.approx(
        cand[cell == 1].mean() - inc[cell == 1].mean()
    )


@pytest.mark.parametrize("doc", ['{"schema": 2}', "{}", "[1]", '{"schema": 1}', "not json"])
def test_unknown_schema_or_malformed(doc: str) -> None:
    with pytest.raises(ValidationError, match="schema|malformed|parse"):
        PairedEvaluation.from_json(doc)


def test_evaluate_pair_on_colored_digits() -> None:
    from patchd.ml.datasets import load_splits
    from patchd.ml.evaluate import evaluate_pair
    from patchd.ml.models import predict, small_cnn

    s = load_splits(DatasetSpec(kind="colored-digits"))
    torch.manual_seed(0)
    a, b = small_cnn(width=4), small_cnn(width=4)
    pe = evaluate_pair(a, b, s.test, s.train)
    assert len(pe.cell) == len(s.test) and pe.ids == s.test.ids
    expect = (predict(b, s.test.x).argmax(1) == s.test.y).numpy()
    assert np.array_equal(pe.candidate_correct, expect)
    assert np.array_equal(pe.cell, s.test.cell_index().numpy())
    mix = np.bincount(s.train.cell_index().numpy(), minlength=4) / len(s.train)
    assert pe.train_mix == pytest.approx(tuple(mix))
    assert PairedEvaluation.from_json(pe.to_json()).incumbent == pe.incumbent


def test_default_mix_is_the_evaluation_data_own_mix() -> None:
    cell, inc, cand = _data(2)
    pe = paired(inc, cand, cell, CLASSES, GROUPS)
    assert pe.incumbent.average_reweighted == pytest.approx(pe.incumbent.average_pooled)
    assert sum(pe.train_mix) == pytest.approx(1.0) and pe.train_mix[3] == 0.0
    with pytest.raises(ValidationError, match="cell ids"):
        paired(inc[:1], cand[:1], np.array([-2]), CLASSES, GROUPS)  # -1 is "unknown group"

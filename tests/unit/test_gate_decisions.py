"""The gate's verdicts on constructed paired evaluations."""

from __future__ import annotations

import numpy as np
import pytest

from patchd.config import GateConfig
from patchd.exceptions import ValidationError
from patchd.promotion.gate import GateDecision, GateInput, Verdict, bootstrap_deltas, decide
from tests.gate_support import gate_input

CFG = GateConfig(min_improvement=0.02, avg_tolerance=0.02, confidence=0.95, n_min=20)


def test_pass_when_worst_group_rises_and_average_holds() -> None:
    d = decide(gate_input([300] * 4, [0.95, 0.30, 0.92, 0.95], [0.95, 0.75, 0.92, 0.95]), CFG)
    assert d.verdict is Verdict.PASS, d.reasons
    assert d.worst_group_delta == pytest.approx(0.45)
    assert d.worst_group_interval[0] >= 0.02
    assert d.incumbent_worst[0] == "top|color=green"


def test_fail_on_average_drop_even_if_worst_group_rises() -> None:
    d = decide(gate_input([300] * 4, [0.95, 0.30, 0.92, 0.95], [0.75, 0.70, 0.72, 0.75]), CFG)
    assert d.verdict is Verdict.FAIL
    assert any("average" in r and "tolerance" in r for r in d.reasons)


def test_fail_when_worst_group_confidently_does_not_improve() -> None:
    d = decide(gate_input([400] * 4, [0.95, 0.60, 0.92, 0.95], [0.95, 0.55, 0.92, 0.95]), CFG)
    assert d.verdict is Verdict.FAIL
    assert d.worst_group_interval[1] < 0.02


def test_inconclusive_on_small_cell() -> None:
    d = decide(
        gate_input([300, 10, 300, 300], [0.95, 0.30, 0.92, 0.95], [0.95, 0.90, 0.92, 0.95]), CFG
    )
    assert d.verdict is Verdict.INCONCLUSIVE
    assert any("n_min=20" in r for r in d.reasons)


def test_inconclusive_when_interval_straddles_margin() -> None:
    d = decide(gate_input([40] * 4, [0.95, 0.50, 0.92, 0.95], [0.95, 0.575, 0.92, 0.95]), CFG)
    assert d.verdict is Verdict.INCONCLUSIVE
    lo, hi = d.worst_group_interval
    assert lo < 0.02 < hi
    assert any("straddles" in r for r in d.reasons)


def test_worst_group_can_move_to_another_cell() -> None:
    # the patch lifts cell 1 past cell 2, which becomes the new worst: delta = 0.70 - 0.30
    d = decide(gate_input([300] * 4, [0.95, 0.30, 0.80, 0.95], [0.95, 0.90, 0.70, 0.95]), CFG)
    assert d.candidate_worst == ("other|color=red", pytest.approx(0.70))
    assert d.worst_group_delta == pytest.approx(0.40)


def test_decision_is_deterministic_and_round_trips() -> None:
    data = gate_input([100] * 4, [0.9, 0.4, 0.9, 0.9], [0.9, 0.6, 0.9, 0.9])
    a, b = decide(data, CFG), decide(data, CFG)
    assert a == b
    assert GateDecision.from_dict(a.to_dict()) == a


def test_bootstrap_matches_example_resampling() -> None:
    """The multinomial shortcut equals resampling examples within cells (in distribution)."""
    data = gate_input([60, 80], [0.5, 0.8], [0.7, 0.8], seed=3)
    from patchd.promotion.gate import _cell_counts

    d_wg, _ = bootstrap_deltas(_cell_counts(data), 4000)
    rng = np.random.default_rng(1)
    naive = []
    for _ in range(4000):
        accs = []
        for c in (0, 1):
            idx = np.flatnonzero(data.cell == c)
            pick = rng.choice(idx, size=len(idx))
            accs.append((data.incumbent_correct[pick].mean(), data.candidate_correct[pick].mean()))
        naive.append(min(a[1] for a in accs) - min(a[0] for a in accs))
    assert np.mean(d_wg) == pytest.approx(np.mean(naive), abs=0.01)
    assert np.std(d_wg) == pytest.approx(np.std(naive), rel=0.1)


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValidationError):
        GateInput(("a",), np.array([0, 0]), np.array([True]), np.array([True, False]))
    with pytest.raises(ValidationError):
        GateInput(("a",), np.array([1]), np.array([True]), np.array([True]))


def test_inconclusive_when_a_trained_cell_has_no_heldout_examples() -> None:
    data = gate_input([300, 300, 300, 300], [0.95, 0.30, 0.92, 0.95], [0.95, 0.90, 0.92, 0.95])
    keep = data.cell != 3
    cut = GateInput(
        data.cell_names,
        data.cell[keep],
        data.incumbent_correct[keep],
        data.candidate_correct[keep],
        expected=data.cell_names,
    )
    assert decide(
        GateInput(
            *[
                getattr(cut, f)
                for f in ("cell_names", "cell", "incumbent_correct", "candidate_correct")
            ]
        ),
        CFG,
    ).passed
    d = decide(cut, CFG)
    assert d.verdict is Verdict.INCONCLUSIVE
    assert any("no held-out examples" in r for r in d.reasons)

"""The promotion gate: does the candidate beat the incumbent on the worst group, with confidence?

The test (numpy only, runs in serve):

- Both models were scored on the **same held-out examples**, so the comparison is paired. Each
  example falls into a cell (class, subgroup) and into one of four outcomes (incumbent right or
  wrong) x (candidate right or wrong).
- **Paired bootstrap, stratified by cell.** Each replicate resamples every cell's examples with
  replacement, keeping each example's pair of outcomes together and each cell's size fixed. For
  binary outcomes that is exactly a multinomial draw of the four outcome counts per cell, so
  B = ``gate.n_bootstrap`` replicates cost a few milliseconds. Per replicate we compute
  ``d_wg = min_cell acc_cand - min_cell acc_inc`` and ``d_avg = acc_cand - acc_inc`` (pooled).
- Why not McNemar on the worst cell: the worst cell of the candidate is often a *different* cell
  than the incumbent's (a patch lifts one group and lowers another), and McNemar would test one
  fixed cell and miss the shift; the bootstrap of the min over cells accounts for it, and it gives
  an interval we can compare with a non-zero margin.
- Two one-sided intervals at ``gate.confidence``:
  * worst group: **pass-side** if the lower bound of ``d_wg`` >= ``min_improvement``;
    **fail-side** if the upper bound < ``min_improvement``; otherwise the interval straddles the
    margin -> inconclusive.
  * average: ok if the lower bound of ``d_avg`` >= ``-avg_tolerance``; **fail** if the point
    estimate is below ``-avg_tolerance``; otherwise (straddles the tolerance) inconclusive.
- An example whose group is unknown (cell id ``UNKNOWN_CELL``, -1: a group-less held-out row next
  to grouped production events) is in no cell: it counts in the average (resampled as a stratum
  of its own) and never in a group's accuracy.
- Any cell with fewer than ``gate.n_min`` examples makes the worst-group comparison unreliable:
  inconclusive (a clear average drop still fails).

Verdict: fail if any fail-side condition holds, else inconclusive if anything is uncertain, else
pass. Inconclusive is never promoted. The replicates use a fixed seed, so the same evidence
always gives the same decision.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from patchd.config import GateConfig
from patchd.evaluation import UNKNOWN_CELL
from patchd.exceptions import ValidationError

if TYPE_CHECKING:
    from patchd.evaluation import PairedEvaluation

SEED = 20261123


class Verdict(enum.StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class GateInput:
    """Paired per-example outcomes on the held-out set."""

    cell_names: tuple[str, ...]  # e.g. "tops | color=red"
    cell: np.ndarray  # int [N], index into cell_names
    incumbent_correct: np.ndarray  # bool [N]
    candidate_correct: np.ndarray  # bool [N]
    # cells that must have held-out examples (those in the training mix); one without any makes
    # the worst group unknowable -> inconclusive
    expected: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.cell)
        if len(self.incumbent_correct) != n or len(self.candidate_correct) != n:
            raise ValidationError(
                "bad_evaluation",
                f"per-example arrays disagree: cell {n}, incumbent {len(self.incumbent_correct)},"
                f" candidate {len(self.candidate_correct)}",
            )
        if n == 0:
            raise ValidationError("bad_evaluation", "the evaluation has no held-out examples")
        if int(np.max(self.cell)) >= len(self.cell_names) or int(np.min(self.cell)) < UNKNOWN_CELL:
            raise ValidationError("bad_evaluation", "cell index outside cell_names")
        if not bool((np.asarray(self.cell) >= 0).any()):
            raise ValidationError(
                "bad_evaluation",
                f"none of the {n} held-out examples has a known group, so no group can be "
                "judged; give the held-out data groups (data.heldout with group columns) or "
                "label production events that carry them",
            )


@dataclass(frozen=True)
class CellOutcome:
    name: str
    n: int
    incumbent: float
    candidate: float
    both_right: int
    only_incumbent: int  # incumbent right, candidate wrong
    only_candidate: int  # candidate right, incumbent wrong
    both_wrong: int


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    reasons: tuple[str, ...]  # one line each, shown in the report and the API
    worst_group_delta: float
    worst_group_interval: tuple[float, float]  # two one-sided bounds at `confidence`
    avg_delta: float
    avg_interval: tuple[float, float]
    incumbent_worst: tuple[str, float]  # (cell, accuracy)
    candidate_worst: tuple[str, float]
    incumbent_avg: float
    candidate_avg: float
    cells: tuple[CellOutcome, ...]
    min_improvement: float
    avg_tolerance: float
    confidence: float
    n_min: int
    n_bootstrap: int
    method: str = "paired bootstrap stratified by cell"

    @property
    def passed(self) -> bool:
        return self.verdict is Verdict.PASS

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateDecision:
        values = dict(data)
        values["verdict"] = Verdict(values["verdict"])
        values["cells"] = tuple(CellOutcome(**c) for c in values["cells"])
        for key in ("reasons",):
            values[key] = tuple(values[key])
        for key in ("worst_group_interval", "avg_interval", "incumbent_worst", "candidate_worst"):
            values[key] = tuple(values[key])
        return cls(**values)


def gate_input(evaluation: PairedEvaluation) -> GateInput:
    """The per-example arrays of an evaluate-stage report, with cell names ``class|group``."""
    names = tuple(c.key for c in evaluation.incumbent.cells)
    return GateInput(
        cell_names=names,
        cell=np.asarray(evaluation.cell, dtype=np.int64),
        incumbent_correct=np.asarray(evaluation.incumbent_correct, dtype=bool),
        candidate_correct=np.asarray(evaluation.candidate_correct, dtype=bool),
        expected=tuple(
            n for n, share in zip(names, evaluation.train_mix, strict=False) if share > 0
        ),
    )


def _outcomes(data: GateInput) -> np.ndarray:
    """Per example: 0 both right, 1 only incumbent, 2 only candidate, 3 both wrong."""
    inc = np.asarray(data.incumbent_correct, dtype=bool)
    cand = np.asarray(data.candidate_correct, dtype=bool)
    return np.where(inc, np.where(cand, 0, 1), np.where(cand, 2, 3))


def _cell_counts(data: GateInput) -> np.ndarray:
    """[cells, 4] outcome counts per cell (examples of unknown group are in none)."""
    cell = np.asarray(data.cell, dtype=np.int64)
    known = cell >= 0
    counts = np.zeros((len(data.cell_names), 4), dtype=np.int64)
    np.add.at(counts, (cell[known], _outcomes(data)[known]), 1)
    return counts


def _unknown_counts(data: GateInput) -> np.ndarray:
    """[4] outcome counts of the examples whose group is unknown."""
    unknown = np.asarray(data.cell, dtype=np.int64) == UNKNOWN_CELL
    return np.bincount(_outcomes(data)[unknown], minlength=4).astype(np.int64)


def _accuracies(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Incumbent and candidate accuracy per cell (last axis = the 4 outcome counts)."""
    n = counts.sum(axis=-1)
    inc = (counts[..., 0] + counts[..., 1]) / n
    cand = (counts[..., 0] + counts[..., 2]) / n
    return inc, cand


def bootstrap_deltas(
    counts: np.ndarray, n_boot: int, seed: int = SEED, unknown: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Replicates of (worst-group delta, pooled average delta), stratified by cell.

    ``unknown`` (the [4] outcome counts of examples of unknown group) is one more stratum of
    the average only.
    """
    rng = np.random.default_rng(seed)
    present = counts[counts.sum(axis=1) > 0]
    reps = np.stack(
        [rng.multinomial(int(row.sum()), row / row.sum(), size=n_boot) for row in present], axis=1
    )  # [B, cells, 4]
    inc, cand = _accuracies(reps)
    d_wg = cand.min(axis=1) - inc.min(axis=1)
    pooled = reps.sum(axis=1)  # [B, 4]
    if unknown is not None and unknown.sum() > 0:
        pooled = pooled + rng.multinomial(int(unknown.sum()), unknown / unknown.sum(), n_boot)
    d_avg = (pooled[:, 2] - pooled[:, 1]) / pooled.sum(axis=1)
    return d_wg, d_avg


def decide(data: GateInput, config: GateConfig) -> GateDecision:
    """Run the gate on paired held-out outcomes (see the module docstring)."""
    counts = _cell_counts(data)
    present = counts.sum(axis=1) > 0
    names = [n for n, p in zip(data.cell_names, present, strict=True) if p]
    inc, cand = _accuracies(counts[present])
    unknown = _unknown_counts(data)
    d_wg_boot, d_avg_boot = bootstrap_deltas(counts, config.n_bootstrap, unknown=unknown)
    alpha = 1.0 - config.confidence
    wg_iv = (float(np.quantile(d_wg_boot, alpha)), float(np.quantile(d_wg_boot, 1 - alpha)))
    avg_iv = (float(np.quantile(d_avg_boot, alpha)), float(np.quantile(d_avg_boot, 1 - alpha)))
    totals = counts[present].sum(axis=0) + unknown
    inc_avg = float((totals[0] + totals[1]) / totals.sum())
    cand_avg = float((totals[0] + totals[2]) / totals.sum())
    cells = tuple(
        CellOutcome(name, int(row.sum()), float(i), float(c), *(int(x) for x in row))
        for name, row, i, c in zip(names, counts[present], inc, cand, strict=True)
    )
    d_wg = float(cand.min() - inc.min())
    missing = [name for name in data.expected if name not in names]
    verdict, reasons = _verdict(cells, missing, d_wg, wg_iv, cand_avg - inc_avg, avg_iv, config)
    return GateDecision(
        verdict=verdict,
        reasons=tuple(reasons),
        worst_group_delta=d_wg,
        worst_group_interval=wg_iv,
        avg_delta=cand_avg - inc_avg,
        avg_interval=avg_iv,
        incumbent_worst=(names[int(inc.argmin())], float(inc.min())),
        candidate_worst=(names[int(cand.argmin())], float(cand.min())),
        incumbent_avg=inc_avg,
        candidate_avg=cand_avg,
        cells=cells,
        min_improvement=config.min_improvement,
        avg_tolerance=config.avg_tolerance,
        confidence=config.confidence,
        n_min=config.n_min,
        n_bootstrap=config.n_bootstrap,
    )


def _verdict(
    cells: Sequence[CellOutcome],
    missing: Sequence[str],
    d_wg: float,
    wg_iv: tuple[float, float],
    d_avg: float,
    avg_iv: tuple[float, float],
    config: GateConfig,
) -> tuple[Verdict, list[str]]:
    fails: list[str] = []
    unsure: list[str] = []
    conf = f"{config.confidence:.0%}"
    small = [c.name for c in cells if c.n < config.n_min] + list(missing)
    for c in cells:
        if c.n < config.n_min:
            unsure.append(f"cell {c.name} has {c.n} held-out examples < n_min={config.n_min}")
    for name in missing:
        unsure.append(f"cell {name} is in the training data but has no held-out examples")
    margin, tol = config.min_improvement, config.avg_tolerance
    wg_ok = ""
    wg_txt = f"worst-group change {d_wg:+.3f} ({conf} bounds {wg_iv[0]:+.3f}..{wg_iv[1]:+.3f})"
    if wg_iv[0] >= margin:
        wg_ok = f"{wg_txt} clears the required +{margin:.3f}"
    elif wg_iv[1] < margin and not small:
        fails.append(f"{wg_txt} is confidently below the required +{margin:.3f}")
    elif not small:
        unsure.append(f"{wg_txt} straddles the required +{margin:.3f}")
    avg_txt = f"average change {d_avg:+.3f} ({conf} bounds {avg_iv[0]:+.3f}..{avg_iv[1]:+.3f})"
    if d_avg < -tol:
        fails.append(f"{avg_txt} falls more than the tolerance {tol:.3f}")
    elif avg_iv[0] < -tol:
        unsure.append(f"{avg_txt} may fall more than the tolerance {tol:.3f}")
    if fails:
        return Verdict.FAIL, fails + unsure
    if unsure:
        return Verdict.INCONCLUSIVE, unsure
    return Verdict.PASS, [wg_ok, f"{avg_txt} stays within the tolerance {tol:.3f}"]

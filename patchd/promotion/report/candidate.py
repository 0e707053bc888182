"""The candidate report: everything a person reads before approving, as one frozen value.

:func:`build_report` gathers the gate decision, the paired evaluation (per-cell accuracy with
Wilson intervals), the run's recipe and stage timings, the mined failure directions and the
example images (the miner's ``failure_report.png`` and the augmenter's previews) from the run's
artifact dir. :meth:`CandidateReport.to_json` is ``report.json``;
:mod:`patchd.promotion.report.html` renders ``report.html`` with the images embedded as data URIs,
so the file stands alone.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from patchd.evaluation import PairedEvaluation
from patchd.exceptions import ValidationError
from patchd.promotion.gate import GateDecision
from patchd.runs.regions import RegionLabels, labels_path, read_labels

log = logging.getLogger(__name__)

REPORT_SCHEMA = 1
MAX_IMAGE_BYTES = 4 << 20
MAX_PREVIEWS = 12


@dataclass(frozen=True)
class CellRow:
    cls: str
    group: str
    n: int
    incumbent: float | None
    incumbent_ci: tuple[float, float]
    candidate: float | None
    candidate_ci: tuple[float, float]
    delta: float | None
    incumbent_worst: bool
    candidate_worst: bool


@dataclass(frozen=True)
class Image:
    name: str  # file name in the run's artifacts
    caption: str
    data: bytes = field(repr=False)  # PNG bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.data).decode()


@dataclass(frozen=True)
class CandidateReport:
    candidate_id: str
    model: str
    digest: str
    parent: str | None
    run_id: str
    state: str
    decision: GateDecision
    rows: tuple[CellRow, ...]
    recipe: dict[str, Any]
    stage_seconds: dict[str, float]
    failure_modes: tuple[dict[str, Any], ...]
    images: tuple[Image, ...] = ()
    fidelity: dict[str, Any] | None = None  # synthesize/fidelity.json (patchd.ml.fidelity)
    regions: dict[str, Any] | None = None  # Defuse failure regions (see :func:`defuse_regions`)
    region_images: tuple[Image, ...] = ()  # their sample grids and the VAE preview
    disk_bytes: dict[str, int] = field(default_factory=dict)  # stage -> bytes on disk
    production_slice: dict[str, Any] = field(default_factory=dict)  # collect's slice counts
    expires_at: float | None = None  # end of the approval window (awaiting_approval only)
    decided_by: str | None = None
    generated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = REPORT_SCHEMA
        out["decision"] = self.decision.to_dict()
        out["images"] = [{"name": i.name, "caption": i.caption} for i in self.images]
        out["region_images"] = [{"name": i.name, "caption": i.caption} for i in self.region_images]
        return _finite(out)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _acc(value: float) -> float | None:
    return value if math.isfinite(value) else None


def cell_rows(evaluation: PairedEvaluation) -> tuple[CellRow, ...]:
    """One row per (class, group) cell with examples, both models side by side."""
    inc_worst = evaluation.incumbent.worst_cell
    cand_worst = evaluation.candidate.worst_cell
    rows = []
    for pair in evaluation.rows:
        a, b = pair.incumbent, pair.candidate
        if a.n == 0:
            continue
        rows.append(
            CellRow(
                cls=a.class_name,
                group=a.group_name,
                n=a.n,
                incumbent=_acc(a.accuracy),
                incumbent_ci=(a.ci_low, a.ci_high),
                candidate=_acc(b.accuracy),
                candidate_ci=(b.ci_low, b.ci_high),
                delta=_acc(pair.delta),
                incumbent_worst=inc_worst == (a.cls, a.group),
                candidate_worst=cand_worst == (b.cls, b.group),
            )
        )
    return tuple(rows)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def failure_modes(run_dir: Path) -> tuple[dict[str, Any], ...]:
    """The miner's failure directions (``mine/mining.json``), without the raw vectors."""
    data = _read_json(run_dir / "mine" / "mining.json")
    modes = data.get("modes", []) if isinstance(data, dict) else []
    keep = ("cls", "class_name", "description", "strength", "n_wrong", "n_total")
    return tuple({k: m[k] for k in keep if k in m} for m in modes if isinstance(m, dict))


def _image(path: Path, caption: str) -> Image | None:
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            log.warning("report image %s is over %d bytes; left out", path, MAX_IMAGE_BYTES)
            return None
        data = path.read_bytes()
    except OSError:
        return None
    return Image(path.name, caption, data) if data.startswith(b"\x89PNG") else None


def synthesis_fidelity(run_dir: Path) -> dict[str, Any] | None:
    """The synthesize stage's fidelity report, when the run measured one."""
    data = _read_json(run_dir / "synthesize" / "fidelity.json")
    return data if isinstance(data, dict) else None


STAGES = ("collect", "mine", "synthesize", "train", "evaluate")


def _stage_result(run_dir: Path, stage: str) -> dict[str, Any]:
    data = _read_json(run_dir / stage / "manifest.json")
    result = data.get("result") if isinstance(data, dict) else None
    return result if isinstance(result, dict) else {}


def stage_disk_bytes(run_dir: Path) -> dict[str, int]:
    """Bytes each finished stage wrote (its manifest's ``disk_bytes``)."""
    out = {}
    for stage in STAGES:
        value = _stage_result(run_dir, stage).get("disk_bytes")
        if isinstance(value, int):
            out[stage] = value
    return out


def production_slice(run_dir: Path) -> dict[str, Any]:
    """What ``collect`` did with the labeled production events (counts, rule)."""
    return {k: v for k, v in _stage_result(run_dir, "collect").items() if k.startswith("slice_")}


MAX_REGIONS = 24


def defuse_regions(run_dir: Path) -> tuple[dict[str, Any] | None, tuple[Image, ...]]:
    """The ``vae`` augmenter's regions (``synthesize/regions.json``, schema 2) with each region's
    label from ``regions/labels.json`` (``None``: unlabelled, never the source class), who
    labelled them, the VAE's reconstruction error and realism; and the images: the VAE preview
    and the sample grids of the :data:`MAX_REGIONS` heaviest regions."""
    data = _read_json(run_dir / "synthesize" / "regions.json")
    if not isinstance(data, dict) or not isinstance(data.get("regions"), list):
        return None, ()
    try:
        given = read_labels(labels_path(run_dir))
    except ValidationError:  # an unreadable labels file shows as no labels, as before
        given = RegionLabels({}, {})
    labels = {str(k): v for k, v in given.labels.items()}
    regions = sorted(
        (r for r in data["regions"] if isinstance(r, dict)),
        key=lambda r: -float(r.get("weight", 0.0)),
    )
    rows = [
        {
            **r,
            "label": labels.get(str(r.get("region"))),
            "labelled_by": given.by(int(r["region"])) if "region" in r else None,
        }
        for r in regions[:MAX_REGIONS]
    ]
    images = []
    vae: dict[str, Any] = data["vae"] if isinstance(data.get("vae"), dict) else {}
    if vae.get("preview"):
        images.append(
            _image(
                run_dir / "synthesize" / str(vae["preview"]),
                "VAE: real images, reconstructions, prior samples",
            )
        )
    for r in rows:
        images.append(
            _image(run_dir / "synthesize" / str(r.get("preview")), f"region {r['region']}")
        )
    body = {
        "vae": vae,
        "realism": data.get("realism", {}),
        "flips": data.get("flips"),
        "n_regions": len(regions),
        "labelled_by": given.people,
        "n_labelled": sum(1 for r in regions if str(r.get("region")) in labels),
        "regions": rows,
    }
    return body, tuple(i for i in images if i is not None)


def run_images(run_dir: Path) -> tuple[Image, ...]:
    """Failure examples first, then up to :data:`MAX_PREVIEWS` synthesized samples."""
    found = [_image(run_dir / "mine" / "failure_report.png", "Failure directions: examples")]
    previews = sorted((run_dir / "synthesize" / "previews").glob("*.png"))[:MAX_PREVIEWS]
    found += [_image(p, f"Synthesized: {p.stem}") for p in previews]
    return tuple(i for i in found if i is not None)


def build_report(
    *,
    candidate_id: str,
    model: str,
    digest: str,
    parent: str | None,
    run_id: str,
    state: str,
    decision: GateDecision,
    evaluation: PairedEvaluation,
    recipe: dict[str, Any],
    stage_seconds: dict[str, float],
    run_dir: Path | None,
    expires_at: float | None = None,
    decided_by: str | None = None,
) -> CandidateReport:
    regions, region_images = defuse_regions(run_dir) if run_dir else (None, ())
    return CandidateReport(
        candidate_id=candidate_id,
        model=model,
        digest=digest,
        parent=parent,
        run_id=run_id,
        state=state,
        decision=decision,
        rows=cell_rows(evaluation),
        recipe=recipe,
        stage_seconds=stage_seconds,
        failure_modes=failure_modes(run_dir) if run_dir else (),
        images=run_images(run_dir) if run_dir else (),
        fidelity=synthesis_fidelity(run_dir) if run_dir else None,
        regions=regions,
        region_images=region_images,
        disk_bytes=stage_disk_bytes(run_dir) if run_dir else {},
        production_slice=production_slice(run_dir) if run_dir else {},
        expires_at=expires_at,
        decided_by=decided_by,
    )

"""The FailureReport: what the miner found, as JSON for machines and a PNG grid for people.

The PNG shows, per class, the hardest and the easiest examples along that class's failure
direction, each tile framed red (predicted wrong) or green (right) and captioned with the true
label, the prediction and the signed hardness.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

SCHEMA = 1
TILE = 84  # pixels per image tile
PAD = 8
LABEL_W = 150
CAPTION_H = 44
TITLE_H = 56
# frame colours chosen to stay visible on red/green images: orange = wrong, blue = right
WRONG = (255, 127, 0)
RIGHT = (31, 90, 200)
FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
)


@dataclass(frozen=True)
class GroupLift:
    """How much a group attribute is over-represented on the hard side of a class."""

    group: str
    share_hard: float  # share of the class's hard-side examples in this group
    share_class: float  # share of all the class's examples in this group
    lift: float  # share_hard / share_class


@dataclass(frozen=True)
class ClassReport:
    cls: int
    name: str
    n_total: int
    n_wrong: int
    n_hard: int  # examples on the failure side of the direction
    strength: float  # CV balanced accuracy of the correct-vs-wrong SVM
    c: float | None
    direction_defined: bool
    description: str
    lifts: tuple[GroupLift, ...] = ()
    captions_hard: tuple[str, ...] = ()
    captions_easy: tuple[str, ...] = ()
    hardest_ids: tuple[str, ...] = ()
    easiest_ids: tuple[str, ...] = ()
    # subgroup miner: the mined group of this class on the scored split
    status: str = "mined"  # or why no subgroup was mined (no_errors, few_errors, ...)
    reason: str = ""
    confidence: float | None = None  # see patchd.plugins.miners.membership
    share: float | None = None  # n_hard / class size on the scored split


@dataclass(frozen=True)
class FailureCluster:
    index: int
    size: int
    weight: float
    class_counts: tuple[int, ...]  # wrong examples per class in this cluster
    top_group: str | None  # most frequent group attribute, when groups are known
    top_group_share: float
    example_ids: tuple[str, ...]


@dataclass(frozen=True)
class FailureReport:
    run_id: str
    embedding: str  # "classifier-features" or "clip:<checkpoint>"
    mined: bool  # True: downstream groups are the mined hard/easy sides
    group_names: tuple[str, ...]
    n_fit: int  # examples the SVMs were fit on
    n_assigned: int  # examples the groups were assigned to
    classes: tuple[ClassReport, ...]
    clusters: tuple[FailureCluster, ...]
    schema: int = field(default=SCHEMA)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def summary(self) -> str:
        """The run report as text: each class's mined group, its size, confidence, description."""
        lines = [
            f"run {self.run_id}: fit on {self.n_fit} held-out examples, groups assigned to "
            f"{self.n_assigned} ({self.embedding})"
        ]
        for c in self.classes:
            conf = "n/a" if c.confidence is None else f"{c.confidence:.2f}"
            size = f"{c.n_hard}" + (f" ({c.share:.1%} of the class)" if c.share is not None else "")
            lines.append(
                f"- {c.name}: group size {size}, confidence {conf}, {c.status}: {c.description}"
                + (f" [{c.reason}]" if c.reason else "")
            )
        return "\n".join(lines)

    def write(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path


def lifts_for(
    groups: np.ndarray, hard: np.ndarray, names: tuple[str, ...]
) -> tuple[GroupLift, ...]:
    """Group shares on the hard side vs the whole class, highest lift first."""
    if len(groups) == 0 or not hard.any() or not names:
        return ()
    out = []
    for gi, name in enumerate(names):
        share_class = float((groups == gi).mean())
        if share_class == 0:
            continue
        share_hard = float((groups[hard] == gi).mean())
        out.append(GroupLift(name, share_hard, share_class, share_hard / share_class))
    return tuple(sorted(out, key=lambda lift: -lift.lift))


MIN_DESCRIBED_ERRORS = 5  # fewer wrong examples than this: no claim about a failing group


def describe(
    name: str, n_hard: int, n_total: int, lifts: tuple[GroupLift, ...], n_wrong: int
) -> str:
    """What was found for one class, claiming a failing group only where errors back it.

    ``n_wrong`` counts the wrong predictions among the ``n_total`` examples the lifts were
    measured on; with none (or fewer than :data:`MIN_DESCRIBED_ERRORS`) the description says so
    instead of naming a group: a direction can still place correct examples on its far side.
    """
    if n_wrong == 0:
        return f"{name}: no errors among {n_total} examples; no failure mode to describe"
    if n_wrong < MIN_DESCRIBED_ERRORS:
        return (
            f"{name}: {n_wrong} error(s) among {n_total} examples, too few to say which group fails"
        )
    if n_hard == 0:
        return f"{name}: {n_wrong}/{n_total} wrong, but no examples on the failure side"
    top = lifts[0] if lifts else None
    if top is None or top.lift <= 1.05:
        return (
            f"{name}: {n_wrong}/{n_total} wrong, {n_hard} on the failure side; no group attribute "
            "stands out"
        )
    return (
        f"{name}: {top.group} is over-represented on the failure side "
        f"({top.share_hard:.0%} of the {n_hard} examples there vs {top.share_class:.0%} of the "
        f"class; {n_wrong}/{n_total} wrong)"
    )


@dataclass(frozen=True)
class Tile:
    image: torch.Tensor  # [C, H, W] in [0, 1]
    label: str
    pred: str
    hardness: float

    @property
    def wrong(self) -> bool:
        return self.label != self.pred


@dataclass(frozen=True)
class GridRow:
    title: str
    subtitle: str
    tiles: tuple[Tile, ...]


def _font(size: int):  # noqa: ANN202 - PIL font
    from PIL import ImageFont

    for path in FONT_PATHS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _tile_image(tile: Tile):  # noqa: ANN202 - PIL image
    from PIL import Image

    arr = (tile.image.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr[:3]
    im = Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")
    resample = Image.Resampling.NEAREST if im.width * 3 <= TILE else Image.Resampling.BILINEAR
    return im.resize((TILE, TILE), resample)


def _draw_row(canvas, draw, row: GridRow, top: int) -> None:  # noqa: ANN001 - PIL objects
    small, label_font = _font(11), _font(13)
    draw.text((PAD, top + TILE // 2 - 16), row.title, fill="black", font=label_font)
    draw.text((PAD, top + TILE // 2 + 2), row.subtitle, fill=(90, 90, 90), font=small)
    for c, tile in enumerate(row.tiles):
        x = LABEL_W + c * (TILE + PAD)
        canvas.paste(_tile_image(tile), (x, top))
        colour = WRONG if tile.wrong else RIGHT
        draw.rectangle([x - 3, top - 3, x + TILE + 2, top + TILE + 2], outline=colour, width=4)
        verdict = "wrong" if tile.wrong else "right"
        draw.text((x, top + TILE + 4), f"label {tile.label}", fill="black", font=small)
        draw.text((x, top + TILE + 17), f"pred {tile.pred}", fill=colour, font=small)
        draw.text(
            (x, top + TILE + 30), f"{verdict} h={tile.hardness:+.2f}", fill=colour, font=small
        )


def render_grid(rows: list[GridRow], title: str, path: Path) -> Path:
    """Draw the rows of tiles with labels into a PNG."""
    from PIL import Image, ImageDraw

    n_cols = max([len(r.tiles) for r in rows] + [1])
    width = LABEL_W + n_cols * (TILE + PAD) + PAD
    row_h = TILE + CAPTION_H + PAD
    canvas = Image.new("RGB", (width, TITLE_H + len(rows) * row_h + PAD), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, 8), title, fill="black", font=_font(16))
    legend = (
        "frame: orange = predicted wrong, blue = right;  h = signed hardness (> 0: failure side)"
    )
    draw.text((PAD, 32), legend, fill=(70, 70, 70), font=_font(12))
    for r, row in enumerate(rows):
        _draw_row(canvas, draw, row, TITLE_H + r * row_h)
    canvas.save(path, format="PNG")
    return path

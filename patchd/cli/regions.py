"""``patchd regions RUN``: review the failure regions the ``vae`` augmenter (Defuse) found and
label them before the ``defuse`` trainer corrects the model.

Lists each region: id, mixture weight, its label (or ``unlabelled``: the source class the
search started from is shown as such, never as a label), the model's predictions on its samples,
their spread against real images of the source class, their novelty, and the PNG grid of its
samples. ``--label REGION=CLASS`` (repeatable) assigns a class name to a region, or ``invalid`` to
drop it; labels are stored in ``<artifacts>/runs/<run>/regions/labels.json`` with who gave them
(``--by``, default ``person``), written atomically, and read by the defuse trainer. Unlabelled
regions train with their source class (Defuse's premise); the run report says they were
unlabelled. Torch-free.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from patchd.cli.options import config_option
from patchd.config import Config
from patchd.exceptions import NotFoundError, ValidationError

INVALID = "invalid"


def run_dir(config: Config, run_id: str) -> Path:
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValidationError("bad_run_id", f"run id {run_id!r} is not a plain run id")
    path = config.artifacts_root / "runs" / run_id
    if not path.is_dir():
        raise NotFoundError("run", run_id)
    return path


def load_regions(path: Path) -> list[dict[str, Any]]:
    regions_file = path / "synthesize" / "regions.json"
    if not regions_file.is_file():
        raise NotFoundError("regions of run (run it with patch.augmenter: vae)", path.name)
    body = json.loads(regions_file.read_text())
    found = body.get("regions", []) if isinstance(body, dict) else body  # schema 2 / schema 1
    return [source_named(r) for r in found]


def source_named(region: dict[str, Any]) -> dict[str, Any]:
    """A region dict with ``source_name`` (schema-1 files called it ``label_name``)."""
    if "source_name" not in region and "label_name" in region:
        return {**region, "source_name": region["label_name"]}
    return region


def parse_label(text: str, regions: list[dict[str, Any]], classes: set[str]) -> tuple[int, str]:
    region, sep, name = text.partition("=")
    known = {int(r["region"]) for r in regions}
    if not sep or not region.strip().isdigit() or int(region) not in known:
        raise ValidationError(
            "bad_label", f"{text!r} must be REGION=CLASS with REGION in {sorted(known)}"
        )
    name = name.strip()
    if name != INVALID and name not in classes:
        raise ValidationError(
            "bad_label", f"class {name!r} is unknown; use one of {sorted(classes)} or 'invalid'"
        )
    return int(region), name


def write_labels(path: Path, labels: dict[int, str], by: str = "person") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".labels.", suffix=".tmp")
    body = {"schema": 1, "by": by, "labels": {str(k): v for k, v in sorted(labels.items())}}
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@click.command()
@click.argument("run_id")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="REGION=CLASS",
    help="Label a region (or 'invalid').",
)
@click.option("--by", default="person", show_default=True, help="Who gives these labels.")
@config_option
def regions(run_id: str, labels: tuple[str, ...], by: str, config: Config) -> None:
    """List a run's failure regions and their sample PNGs; label them with --label."""
    path = run_dir(config, run_id)
    found = load_regions(path)
    labels_file = path / "regions" / "labels.json"
    current = (
        {int(k): v for k, v in json.loads(labels_file.read_text()).get("labels", {}).items()}
        if labels_file.is_file()
        else {}
    )
    classes = (
        {str(r["source_name"]) for r in found}
        | {str(r["predicted"]) for r in found}
        | set(config.model.class_names or [])
    )
    for text in labels:
        region, name = parse_label(text, found, classes)
        current[region] = name
    if labels:
        write_labels(labels_file, current, by=by)
        click.echo(f"saved {len(labels)} label(s) to {labels_file}")
    for line in region_table(found, current, path / "synthesize"):
        click.echo(line)
    missing = [str(r["region"]) for r in found if int(r["region"]) not in current]
    if missing:
        click.echo(
            f"unlabelled regions: {', '.join(missing)} (the defuse trainer uses their source "
            "class, which no person confirmed); label them with --label REGION=CLASS|invalid"
        )


def _mix(region: dict[str, Any]) -> str:
    mix = region.get("prediction_mix") or {region.get("predicted", "?"): None}
    items = sorted(mix.items(), key=lambda kv: -(kv[1] or 0))
    return ", ".join(k if v is None else f"{k} ×{v}" for k, v in items)


def _ratio(region: dict[str, Any]) -> str:
    spread, real = region.get("spread"), region.get("real_spread")
    if not isinstance(spread, int | float) or not isinstance(real, int | float) or real <= 0:
        return "n/a"
    return f"{spread / real:.2f}"


def region_table(found: list[dict[str, Any]], labels: dict[int, str], stage: Path) -> list[str]:
    """Markdown lines: one row per region with its label or ``unlabelled``."""
    out = [
        "| region | weight | label | source class | model predicts | spread / real | novelty "
        "| samples |",
        "|---:|---:|---|---|---|---:|---:|---|",
    ]
    for r in found:
        label = labels.get(int(r["region"]), "unlabelled")
        novelty = r.get("novelty")
        nov = f"{novelty:.2f}" if isinstance(novelty, int | float) else "n/a"
        out.append(
            f"| {r['region']} | {r['weight']:.3f} | {label} | {r['source_name']} | {_mix(r)} "
            f"| {_ratio(r)} | {nov} | {stage / r['preview']} |"
        )
    return out

"""``patchd regions RUN``: review the failure regions the ``vae`` augmenter (Defuse) found and
label them before the ``defuse`` trainer corrects the model.

Lists each region (id, mixture weight, its default label, the model's wrong prediction and the
PNG of its samples). ``--label REGION=CLASS`` (repeatable) assigns a class name to a region, or
``invalid`` to drop it; labels are stored in ``<artifacts>/runs/<run>/regions/labels.json``,
written atomically, and read by the defuse trainer. Torch-free.
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
    return list(json.loads(regions_file.read_text()))


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


def write_labels(path: Path, labels: dict[int, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".labels.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"schema": 1, "labels": {str(k): v for k, v in sorted(labels.items())}}, fh, indent=2
        )
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
@config_option
def regions(run_id: str, labels: tuple[str, ...], config: Config) -> None:
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
        {str(r["label_name"]) for r in found}
        | {str(r["predicted"]) for r in found}
        | set(config.model.class_names or [])
    )
    for text in labels:
        region, name = parse_label(text, found, classes)
        current[region] = name
    if labels:
        write_labels(labels_file, current)
        click.echo(f"saved {len(labels)} label(s) to {labels_file}")
    click.echo("| region | weight | label | model predicts | samples |")
    click.echo("|---:|---:|---|---|---|")
    for r in found:
        label = current.get(int(r["region"]), f"{r['label_name']} (default)")
        png = path / "synthesize" / r["preview"]
        click.echo(f"| {r['region']} | {r['weight']:.3f} | {label} | {r['predicted']} | {png} |")

"""``patchd regions RUN``: review the failure regions the ``vae`` augmenter (Defuse) found and
label them before the ``defuse`` trainer corrects the model.

Lists each region: id, mixture weight, its label (or ``unlabelled``: the source class the
search started from is shown as such, never as a label), the model's predictions on its samples,
their spread against real images of the source class, their novelty, and the PNG grid of its
samples. ``--label REGION=CLASS`` (repeatable) assigns a class name to a region, or ``invalid`` to
drop it; labels are stored in ``<artifacts>/runs/<run>/regions/labels.json`` with who gave each
(``--by``, default ``person``) by :func:`patchd.runs.regions.set_labels`, the same writer the
approval pages use, and read by the defuse trainer (refused once its train stage has started).
Unlabelled regions train with their source class (Defuse's premise); the run report says they
were unlabelled. A run with ``patch.params.defuse.wait_for_labels`` (default true) waits in
``awaiting_labels`` after synthesize; ``--done`` (after any ``--label``) resumes it through serve
(``POST /v1/runs/{id}/resume``, approve scope) and it trains with these labels. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from patchd.cli.options import config_option, model_option
from patchd.config import Config
from patchd.exceptions import ValidationError
from patchd.runs import regions as store
from patchd.runs.regions import load_regions


def run_dir(config: Config, run_id: str) -> Path:
    """The run's dir; with the artifacts in a bucket, its regions and labels fetched first."""
    from patchd.runs.artifacts import RunArtifacts

    RunArtifacts.from_config(config).fetch_regions(run_id)
    return store.run_dir(config.artifacts_root, run_id)


def parse_label(text: str) -> tuple[str, str]:
    """``REGION=CLASS`` as its two parts (checked by :func:`patchd.runs.regions.set_labels`)."""
    region, sep, name = text.partition("=")
    if not sep or not region.strip() or not name.strip():
        raise ValidationError("bad_label", f"{text!r} must be REGION=CLASS (or REGION=invalid)")
    return region.strip(), name.strip()


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
@click.option(
    "--done", is_flag=True, help="Labelling is done: resume the run awaiting labels (via serve)."
)
@config_option
@model_option
def regions(run_id: str, labels: tuple[str, ...], by: str, done: bool, config: Config) -> None:
    """List a run's failure regions and their sample PNGs; label them with --label."""
    path = run_dir(config, run_id)
    found = load_regions(path)
    given = dict(parse_label(text) for text in labels)
    current = store.set_labels(path, given, by, config.model.class_names or [])
    if labels:
        from patchd.runs.artifacts import RunArtifacts

        RunArtifacts.from_config(config).publish_labels(run_id)
        click.echo(f"saved {len(labels)} label(s) to {store.labels_path(path)}")
    for line in region_table(found, current, path / "synthesize"):
        click.echo(line)
    missing = [str(r["region"]) for r in found if int(r["region"]) not in current.labels]
    if done:
        from patchd.cli.runs import resume_run

        body = resume_run(config, run_id)
        click.echo(f"run {body['id']}: labelling done, {body['state']} ({body.get('stage')})")
    if missing:
        click.echo(
            f"unlabelled regions: {', '.join(missing)} (the defuse trainer uses their source "
            "class, which no person confirmed); label them with --label REGION=CLASS|invalid"
        )


def _mix(region: dict[str, Any]) -> str:
    items = store.prediction_mix(region)
    return ", ".join(k if v is None else f"{k} ×{v}" for k, v in items)


def _ratio(region: dict[str, Any]) -> str:
    ratio = store.spread_ratio(region)
    return "n/a" if ratio is None else f"{ratio:.2f}"


def region_table(found: list[dict[str, Any]], labels: store.RegionLabels, stage: Path) -> list[str]:
    """Markdown lines: one row per region with its label and who gave it, or ``unlabelled``."""
    out = [
        "| region | weight | label | source class | model predicts | spread / real | novelty "
        "| samples |",
        "|---:|---:|---|---|---|---:|---:|---|",
    ]
    for r in found:
        region = int(r["region"])
        label = labels.labels.get(region, "unlabelled")
        if region in labels.labels and labels.by(region):
            label = f"{label} (by {labels.by(region)})"
        novelty = r.get("novelty")
        nov = f"{novelty:.2f}" if isinstance(novelty, int | float) else "n/a"
        out.append(
            f"| {r['region']} | {r['weight']:.3f} | {label} | {r['source_name']} | {_mix(r)} "
            f"| {_ratio(r)} | {nov} | {stage / r['preview']} |"
        )
    return out

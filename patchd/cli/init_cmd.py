"""``patchd init``: a commented starter ``patchd.yaml`` from a dataset table and a weights file.

Before writing anything it checks what the first patch run would otherwise find out late: the
table's columns, labels and image paths (:func:`patchd.ml.starter.inspect_table`), that the model
builds from its factory, loads the safetensors weights, runs on a batch of the data and returns
one score per class (:func:`patchd.ml.starter.check_model`). The written file is validated as a
:class:`~patchd.config.Config` before it is saved; an existing file is kept unless ``--force``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from patchd.cli.safe import printable

if TYPE_CHECKING:
    from patchd.config import InputNormalization
    from patchd.ml.starter import ModelCheck, TableSummary

BUILTIN_FACTORIES = ("patchd.ml.models:small_cnn", "patchd.ml.models:resnet18")
GATE_N_MIN = 20  # gate.n_min's default: held-out cells below it make a verdict inconclusive


@dataclass(frozen=True)
class Recipe:
    miner: str
    augmenter: str
    trainer: str
    why: str
    epochs: int = 4  # patch.budget.epochs


def choose_recipe(choice: str, has_groups: bool) -> Recipe:
    """The starter recipe; ``auto``: Group DRO on the true groups, or on mined ones."""
    if choice == "camel":
        return Recipe(
            "subgroup",
            "maskpaste",
            "camel",
            "CAMEL: per-class subgroup translation + consistency + class-conditional Group DRO",
            epochs=15,  # the quality bench: camel needs ~15 fine-tune epochs, gdro is as good at 4
        )
    if choice == "erm":
        return Recipe("subgroup", "none", "erm", "plain fine-tuning (a baseline)")
    why = (
        "Group DRO on the table's true groups"
        if has_groups
        else "Group DRO on groups the subgroup miner finds (no group columns)"
    )
    return Recipe("subgroup", "none", "gdro", why)


def _csv_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _floats(name: str, value: str | None) -> list[float] | None:
    items = _csv_list(value)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of numbers", param_hint=name
        ) from None


def _normalization(mean: list[float] | None, std: list[float] | None) -> InputNormalization | None:
    from pydantic import ValidationError

    from patchd.config import InputNormalization

    if mean is None or std is None:
        return None
    try:
        return InputNormalization(mean=mean, std=std)
    except ValidationError as err:
        msg = "; ".join(e["msg"] for e in err.errors())
        raise click.BadParameter(msg, param_hint="--normalize-mean/--normalize-std") from None


def _kwargs(raw: str | None, factory: str, n_classes: int) -> dict[str, Any]:
    if raw is None:
        return {"num_classes": n_classes} if factory in BUILTIN_FACTORIES else {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--factory-kwargs") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--factory-kwargs")
    return value


def _shown_path(path: Path, base: Path) -> str:
    """``path`` relative to the config's folder when it lies inside it (patchd rebases it)."""
    path = path.resolve()
    return str(path.relative_to(base)) if path.is_relative_to(base) else str(path)


@click.command()
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The dataset table (default: <root>/labels.csv, or metadata.csv for wilds-metadata).",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Image folder the table's paths are relative to (default: the table's folder).",
)
@click.option(
    "--kind",
    type=click.Choice(["image-csv", "wilds-metadata"]),
    default="image-csv",
    show_default=True,
    help="image-csv: path,label,split columns; wilds-metadata: img_filename,y,split.",
)
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="safetensors state dict of the model in production now.",
)
@click.option(
    "--factory",
    default="patchd.ml.models:small_cnn",
    show_default=True,
    help="module:callable that builds the architecture (importable where patchd runs).",
)
@click.option(
    "--factory-kwargs",
    default=None,
    help='JSON keyword arguments of the factory (default for the built-ins: {"num_classes": K}).',
)
@click.option("--name", default="model", show_default=True, help="Model name (model.name).")
@click.option("--class-names", default=None, help="Comma-separated, in output order.")
@click.option(
    "--group-columns",
    default=None,
    help="Comma-separated subgroup columns ('' for none; default: columns with <= 16 values).",
)
@click.option("--image-size", type=int, default=None, help="Square side the model sees.")
@click.option("--normalize-mean", default=None, help="Per-channel mean, e.g. 0.485,0.456,0.406.")
@click.option("--normalize-std", default=None, help="Per-channel std, e.g. 0.229,0.224,0.225.")
@click.option(
    "--recipe",
    type=click.Choice(["auto", "gdro", "camel", "erm"]),
    default="auto",
    show_default=True,
    help="auto/gdro: Group DRO on true or mined groups; camel: translation + consistency.",
)
@click.option("--batch-size", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("patchd.yaml"),
    show_default=True,
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def init(
    csv_path: Path | None,
    root: Path | None,
    kind: str,
    weights: Path,
    factory: str,
    factory_kwargs: str | None,
    name: str,
    class_names: str | None,
    group_columns: str | None,
    image_size: int | None,
    normalize_mean: str | None,
    normalize_std: str | None,
    recipe: str,
    batch_size: int,
    output: Path,
    force: bool,
) -> None:
    """Check a dataset table and a model against each other; write a starter patchd.yaml."""
    from patchd.ml.datasets import NATIVE_SIZES
    from patchd.ml.starter import check_model, inspect_table, require_splits

    if output.exists() and not force:
        raise click.ClickException(f"{output} exists; pass --force to overwrite it")
    if csv_path is None and root is None:
        raise click.UsageError("give the dataset table (--csv) or its folder (--root)")
    root = (root or csv_path.parent).resolve()  # type: ignore[union-attr]
    summary = inspect_table(kind, root, csv_path, _csv_list(group_columns), _csv_list(class_names))
    warnings = require_splits(summary)
    mean, std = (
        _floats("--normalize-mean", normalize_mean),
        _floats("--normalize-std", normalize_std),
    )
    if (mean is None) != (std is None):
        raise click.UsageError("give both --normalize-mean and --normalize-std, or neither")
    norm = _normalization(mean, std)
    size = image_size or NATIVE_SIZES[kind]
    kwargs = _kwargs(factory_kwargs, factory, len(summary.class_names))
    batch = summary.batch("test", batch_size, size)
    check = check_model(factory, kwargs, weights.resolve(), norm, batch, summary.class_names)
    chosen = choose_recipe(recipe, bool(summary.group_columns))
    warnings += _cell_warnings(summary) + _chance_warning(check, len(summary.class_names))
    base = output.resolve().parent
    text = render(summary, check, chosen, Starter(name, factory, kwargs, weights, norm, size), base)
    _validate(text, base)
    output.write_text(text)
    _report(summary, check, chosen, warnings, output)


@dataclass(frozen=True)
class Starter:
    """The model part of the starter file."""

    name: str
    factory: str
    factory_kwargs: dict[str, Any]
    weights: Path
    normalization: InputNormalization | None
    image_size: int


def _cell_warnings(summary: TableSummary) -> list[str]:
    small = {k: n for k, n in summary.cell_counts["test"].items() if n < GATE_N_MIN}
    if not small:
        return []
    shown = ", ".join(f"{printable(k)} {n}" for k, n in list(small.items())[:6])
    return [
        f"{len(small)} test cell(s) have fewer than gate.n_min={GATE_N_MIN} rows ({shown}); "
        "the gate calls a verdict on them inconclusive: add test rows, or set gate.n_min"
    ]


def _chance_warning(check: ModelCheck, n_classes: int) -> list[str]:
    if not check.batch_accuracy <= 1.0 / n_classes:
        return []
    return [
        f"the model is at or below chance ({check.batch_accuracy:.2f}) on a test batch of its "
        "own data: check its preprocessing (model.input_normalization, image_size, RGB order)"
    ]


def _validate(text: str, base: Path) -> None:
    import yaml

    from patchd.config import build_config

    build_config(yaml.safe_load(text), base_dir=base)  # ConfigError: a bug in render


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime())


def _j(value: object) -> str:
    return json.dumps(value)


def render(
    summary: TableSummary, check: ModelCheck, recipe: Recipe, model: Starter, base: Path
) -> str:
    """The starter file: every choice commented, paths relative to the file's folder."""
    groups = list(summary.group_columns)
    norm = model.normalization
    norm_line = (
        f"  input_normalization: {{mean: {_j(norm.mean)}, std: {_j(norm.std)}}}"
        if norm
        else "  # input_normalization: {mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}"
    )
    lines = [
        f"# patchd.yaml written by `patchd init` on {_now()} UTC.",
        "# Check it: patchd config check -c patchd.yaml   (the guide: docs/own-data.md)",
        "# Relative paths are relative to this file's folder.",
        "state_dir: .patchd",
        "",
        "model:",
        f"  name: {_j(model.name)}",
        "  # module:callable that builds the architecture; weights are loaded into it (strict)",
        f"  factory: {_j(model.factory)}",
        f"  factory_kwargs: {_j(model.factory_kwargs)}",
        "  # the model in production now (safetensors); register it: patchd registry import",
        f"  weights: {_j(_shown_path(model.weights, base))}",
        f"  # output i of the model is class_names[i]; checked: {check.output_shape[1]} outputs",
        f"  class_names: {_j(list(summary.class_names))}",
        "  # patchd feeds RGB floats in [0, 1], [N, 3, image_size, image_size], no normalization;",
        "  # a model trained on normalized inputs names its statistics here",
        norm_line,
        "",
        "groups:",
        "  # the keys of each prediction event's `groups` object that define subgroups: the same",
        "  # names as data.train.group_columns, so production events and the table share cells",
        f"  attributes: {_j(groups)}",
        "",
        "data:",
        "  train:",
        f"    kind: {summary.kind}",
        f"    root: {_j(_shown_path(summary.root, base))}",
        f"    csv: {_j(_shown_path(summary.csv, base))}",
        "    # true subgroups (empty: the subgroup miner finds the failing group of each class)",
        f"    group_columns: {_j(groups)}",
        f"    image_size: {model.image_size}",
        f"    class_names: {_j(list(summary.class_names))}",
        "  # held-out data the gate judges on: this table's test split unless set, e.g.",
        f"  # heldout: {{kind: {summary.kind}, root: ..., csv: ..., group_columns: {_j(groups)}}}",
        "  # 70% of the labeled production events (inputs inside sources.allowed_roots) join",
        "  # training, 30% join the held-out data; false: patch from data.train alone",
        "  use_production_slice: true",
        "",
        "sources:",
        "  # prediction events' input URIs must lie inside one of these (add your image store)",
        f"  allowed_roots: [{_j(_shown_path(summary.root, base))}]",
        "",
        "patch:",
        f"  # {recipe.why}",
        "  # compare recipes on this data first: patchd bench quality -c patchd.yaml \\",
        "  #   --methods erm,gdro,dfr,camel-maskpaste --epochs 15",
        f"  miner: {recipe.miner}",
        f"  augmenter: {recipe.augmenter}",
        f"  trainer: {recipe.trainer}",
        f"  budget: {{epochs: {recipe.epochs}, batch_size: 64}}",
        "",
        "gate:",
        "  # a candidate passes when worst-group accuracy rises by at least min_improvement",
        "  # (with confidence) and the average falls by at most avg_tolerance",
        "  min_improvement: 0.02",
        "  avg_tolerance: 0.02",
        f"  n_min: {GATE_N_MIN}",
        "",
    ]
    return "\n".join(lines)


def _report(
    summary: TableSummary,
    check: ModelCheck,
    recipe: Recipe,
    warnings: list[str],
    output: Path,
) -> None:
    counts = ", ".join(f"{s} {n}" for s, n in summary.split_counts.items())
    click.echo(f"dataset {summary.csv}: {counts} rows; classes {list(summary.class_names)}")
    if summary.group_columns:
        click.echo(f"  group columns: {', '.join(summary.group_columns)}")
    else:
        click.echo("  no group columns: subgroups will be mined")
    if summary.skipped_columns:
        click.echo(f"  not taken as groups (> 16 values): {', '.join(summary.skipped_columns)}")
    for cell, n in summary.cell_counts["train"].items():
        click.echo(f"  train {printable(cell)}: {n}")
    click.echo(
        f"model: {check.n_parameters:,} parameters; input {list(check.input_shape)} -> "
        f"output {list(check.output_shape)}; accuracy on that test batch {check.batch_accuracy:.2f}"
    )
    click.echo(f"recipe: {recipe.miner} / {recipe.augmenter} / {recipe.trainer} ({recipe.why})")
    for warning in warnings:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    click.echo(f"wrote {output}; next: patchd config check -c {output}")

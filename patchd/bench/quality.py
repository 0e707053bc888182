"""``patchd bench quality``: every recipe and baseline on the same splits, seeds and budget.

One process: load the dataset once, then per seed train the incumbent (ERM from scratch, the
"deployed" model) and patch it with each method, all fine-tuning from the same incumbent
weights with the same budget:

- ``erm``: plain fine-tune (the pipeline's ERMTrainer);
- ``gdro``: Sagawa's online Group DRO; ``dfr``: last layer on group-balanced validation data;
- ``camel``: CycleGAN per class on the true groups + consistency + class-conditional GDRO;
- ``camel-mined``: the same on groups mined by ``SVMDirectionMiner`` with the colour hidden
  (directions fitted on the validation split, whose colours are hidden too; epoch selection on
  the mined validation groups), the production case;
- ``diffusion``: route (b) conditional diffusion samples for the minority cells + camel trainer;
- ``defuse``: VAE failure regions (default labels) + the defuse trainer;
- ``oracle``: trained from scratch on colour-balanced training data (p = 0.5; same images,
  same total epochs), the ceiling.

Hyperparameters are fixed before looking at any result (the papers' values, see each plugin's
docstring); the only data-driven choice is the epoch kept, by validation worst-group accuracy
(DFR tunes C on half the validation split). The test split is only used for the table.
Worst-group = min over (class, colour) test cells; average = pooled test accuracy; gap = best
cell − worst cell. Wall time includes each method's synthesis stage, not the incumbent.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

log = logging.getLogger(__name__)

METHODS = ("erm", "gdro", "dfr", "camel", "camel-mined", "diffusion", "defuse", "oracle")
MACHINE = f"{os.cpu_count()}-core {platform.machine()}, no GPU"


@dataclass(frozen=True)
class MethodResult:
    method: str
    seed: int
    worst: float
    average: float
    gap: float
    seconds: float
    cells: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    """Everything one seed's methods share."""

    splits: Any
    incumbent: Any
    seed: int
    epochs: int
    out_dir: Path
    params: dict[str, dict[str, Any]]
    dataset: str
    n_train: int | None

    def ctx(self, method: str, stage: str, extra: dict[str, dict[str, Any]] | None = None) -> Any:
        from patchd.abc import StageContext
        from patchd.config import BudgetConfig, PatchConfig

        out = self.out_dir / f"seed{self.seed}" / method / stage
        out.mkdir(parents=True, exist_ok=True)
        params = {**self.params, **(extra or {})}
        budget = BudgetConfig(epochs=self.epochs, batch_size=64, lr=1e-3, max_minutes=60)
        return StageContext(
            run_id=f"bench-{method}-s{self.seed}",
            stage=stage,
            out_dir=out,
            params=PatchConfig(params=params, budget=budget, seed=self.seed),
            seed=self.seed,
            progress=lambda f, m: log.debug("%s %s: %.0f%% %s", method, stage, 100 * f, m),
        )


def score(method: str, seed: int, model: Any, test: Any, seconds: float) -> MethodResult:
    from patchd.plugins.trainers.base import group_scores

    s = group_scores(model, test)
    gap = max(s.cells.values()) - s.worst if s.cells else 0.0
    return MethodResult(method, seed, s.worst, s.average, gap, round(seconds, 1), s.cells)


def run_erm(b: Bench) -> Any:
    from patchd.plugins.trainers.erm import ERMTrainer

    return (
        ERMTrainer()
        .train(b.ctx("erm", "train"), b.incumbent, b.splits.train, b.splits.val, None)
        .model
    )


def run_gdro(b: Bench) -> Any:
    from patchd.plugins.trainers.gdro import GroupDROTrainer

    return (
        GroupDROTrainer()
        .train(b.ctx("gdro", "train"), b.incumbent, b.splits.train, b.splits.val, None)
        .model
    )


def run_dfr(b: Bench) -> Any:
    from patchd.plugins.trainers.dfr import DFRTrainer

    return (
        DFRTrainer()
        .train(b.ctx("dfr", "train"), b.incumbent, b.splits.train, b.splits.val, None)
        .model
    )


def run_camel(b: Bench, method: str = "camel", train: Any = None, val: Any = None) -> Any:
    from patchd.plugins.augmenters.cyclegan import CycleGANAugmenter
    from patchd.plugins.trainers.camel import CamelTrainer

    train = b.splits.train if train is None else train
    val = b.splits.val if val is None else val
    aug = CycleGANAugmenter().synthesize(b.ctx(method, "synthesize"), b.incumbent, train)
    return CamelTrainer().train(b.ctx(method, "train"), b.incumbent, train, val, aug).model


def run_camel_mined(b: Bench) -> Any:
    """Colour hidden everywhere; groups = the SVM miner's hard/easy side within each class."""
    import torch

    from patchd.plugins.miners.svm import SVMDirectionMiner

    def hidden(data: Any) -> Any:
        return data.with_groups(torch.full_like(data.g, -1), ())

    train_h, val_h = hidden(b.splits.train), hidden(b.splits.val)
    miner = SVMDirectionMiner()
    mined_train = miner.mine(b.ctx("camel-mined", "mine"), b.incumbent, train_h, fit_data=val_h)
    mined_val = miner.mine(b.ctx("camel-mined", "mine-val"), b.incumbent, val_h)
    train = train_h.with_groups(mined_train.groups, mined_train.group_names)
    val = val_h.with_groups(mined_val.groups, mined_val.group_names)
    agree = (mined_train.groups == (b.splits.train.g != b.splits.train.y).long()).float().mean()
    log.info(
        "camel-mined: mined hard side matches the minority colour on %.3f of train", float(agree)
    )
    return run_camel(b, "camel-mined", train, val)


def run_diffusion(b: Bench) -> Any:
    from patchd.plugins.augmenters.diffusion import DiffusionAugmenter
    from patchd.plugins.trainers.camel import CamelTrainer

    aug = DiffusionAugmenter().synthesize(
        b.ctx("diffusion", "synthesize"), b.incumbent, b.splits.train
    )
    return (
        CamelTrainer()
        .train(b.ctx("diffusion", "train"), b.incumbent, b.splits.train, b.splits.val, aug)
        .model
    )


def run_defuse(b: Bench) -> Any:
    from patchd.plugins.augmenters.vae import VAEAugmenter
    from patchd.plugins.trainers.defuse import DefuseTrainer

    aug = VAEAugmenter().synthesize(b.ctx("defuse", "synthesize"), b.incumbent, b.splits.train)
    return (
        DefuseTrainer()
        .train(b.ctx("defuse", "train"), b.incumbent, b.splits.train, b.splits.val, aug)
        .model
    )


def run_oracle(b: Bench) -> Any:
    from patchd.config import DatasetSpec
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit, seed_everything

    spec = DatasetSpec(kind=b.dataset, n_train=b.n_train, options={"p_train": 0.5})
    balanced = load_splits(spec).train
    seed_everything(b.seed)
    model = small_cnn(num_classes=balanced.num_classes, in_channels=balanced.x.shape[1])
    return fit(
        model, balanced, epochs=BASE_EPOCHS + b.epochs, batch_size=64, lr=1e-3, seed=b.seed
    ).model


RUNNERS: dict[str, Callable[[Bench], Any]] = {
    "erm": run_erm,
    "gdro": run_gdro,
    "dfr": run_dfr,
    "camel": run_camel,
    "camel-mined": run_camel_mined,
    "diffusion": run_diffusion,
    "defuse": run_defuse,
    "oracle": run_oracle,
}
BASE_EPOCHS = 4


def bench_params(dataset: str) -> dict[str, dict[str, Any]]:
    """Plugin hyperparameters of the bench (fixed up front; sized for 2 shared CPU cores)."""
    small = dataset == "colored-digits"
    return {
        "cyclegan": {"steps": 200},
        "diffusion": {"steps": 300, "channels": 32 if small else 24, "samples_per_cell": 128},
        "vae": {"steps": 300 if small else 400},
        "svm": {"max_per_class": 2000},
    }


def train_incumbent(splits: Any, seed: int) -> tuple[Any, float]:
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit, seed_everything

    seed_everything(seed)
    start = time.monotonic()
    model = small_cnn(num_classes=splits.train.num_classes, in_channels=splits.train.x.shape[1])
    fit(model, splits.train, epochs=BASE_EPOCHS, batch_size=64, lr=1e-3, seed=seed)
    return model.eval(), time.monotonic() - start


def parse_overrides(items: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        plugin, dot, name = key.partition(".")
        if not sep or not dot:
            raise click.BadParameter(f"{item!r} is not PLUGIN.KEY=VALUE", param_hint="--set")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(plugin, {})[name] = value
    return out


def run_seed(
    dataset: str,
    splits: Any,
    seed: int,
    methods: list[str],
    epochs: int,
    out: Path,
    n_train: int | None,
    params: dict[str, dict[str, Any]],
) -> list[MethodResult]:
    incumbent, seconds = train_incumbent(splits, seed)
    base = score("incumbent", seed, incumbent, splits.test, seconds)
    click.echo(
        f"seed {seed} incumbent: worst {base.worst:.3f} avg {base.average:.3f} ({seconds:.0f}s)",
        err=True,
    )
    bench = Bench(splits, incumbent, seed, epochs, out, params, dataset, n_train)
    results = [base]
    for method in methods:
        start = time.monotonic()
        model = RUNNERS[method](bench)
        r = score(method, seed, model, splits.test, time.monotonic() - start)
        click.echo(
            f"seed {seed} {method}: worst {r.worst:.3f} avg {r.average:.3f} gap {r.gap:.3f} "
            f"({r.seconds:.0f}s) {r.cells}",
            err=True,
        )
        results.append(r)
    return results


def summarize(results: list[MethodResult]) -> list[dict[str, Any]]:
    rows = []
    for method in dict.fromkeys(r.method for r in results):
        rs = [r for r in results if r.method == method]
        row: dict[str, Any] = {"method": method, "seeds": len(rs)}
        for key in ("worst", "average", "gap", "seconds"):
            vals = [getattr(r, key) for r in rs]
            row[key] = statistics.fmean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def merged(
    old: dict[str, Any], new: list[MethodResult], dataset: str, epochs: int, n_train: int
) -> list[MethodResult]:
    """Earlier runs from ``old`` (same dataset and budget) plus ``new``."""
    if (old.get("dataset"), old.get("epochs"), old.get("n_train")) != (dataset, epochs, n_train):
        raise click.UsageError("--append needs the same --dataset, --epochs and --n-train as --out")
    fresh = {(r.method, r.seed) for r in new}
    kept = [MethodResult(**r) for r in old.get("runs", []) if (r["method"], r["seed"]) not in fresh]
    return kept + new


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| method | worst-group | average | gap | wall s | seeds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['worst']:.3f} ± {r['worst_std']:.3f} "
            f"| {r['average']:.3f} ± {r['average_std']:.3f} | {r['gap']:.3f} ± {r['gap_std']:.3f} "
            f"| {r['seconds']:.0f} ± {r['seconds_std']:.0f} | {r['seeds']} |"
        )
    return "\n".join(lines)


@click.command()
@click.option(
    "--dataset", type=click.Choice(["colored-fmnist", "colored-digits"]), default="colored-fmnist"
)
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0..N-1.")
@click.option("--first-seed", type=int, default=0, show_default=True)
@click.option(
    "--methods", default=",".join(METHODS), show_default=True, help="Comma-separated subset."
)
@click.option(
    "--epochs", type=int, default=3, show_default=True, help="Fine-tuning epochs per method."
)
@click.option(
    "--n-train", type=int, default=None, help="Training images (dataset default when unset)."
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="PLUGIN.KEY=VALUE",
    help="Override a plugin hyperparameter (JSON value), e.g. --set cyclegan.steps=400.",
)
@click.option(
    "--append",
    is_flag=True,
    help="Merge into an existing --out file (same dataset/budget) instead of replacing it.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/results/quality.json"),
    show_default=True,
)
def quality(
    dataset: str,
    seeds: int,
    first_seed: int,
    methods: str,
    epochs: int,
    n_train: int | None,
    overrides: tuple[str, ...],
    append: bool,
    out: Path,
) -> None:
    """Worst-group / average accuracy of every recipe and baseline on the same splits."""
    import torch

    from patchd.config import DatasetSpec
    from patchd.ml.datasets import load_splits

    torch.set_num_threads(int(os.environ.get("PATCHD_BENCH_THREADS", "1")))
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.BadParameter(
            f"unknown methods {unknown}; choose from {list(METHODS)}", param_hint="--methods"
        )
    params = bench_params(dataset)
    for plugin, values in parse_overrides(overrides).items():
        params[plugin] = {**params.get(plugin, {}), **values}
    load_before = os.getloadavg()[0]
    splits = load_splits(DatasetSpec(kind=dataset, n_train=n_train))
    artifacts = out.parent / f"quality-{dataset}"
    results: list[MethodResult] = []
    for seed in range(first_seed, first_seed + seeds):
        results += run_seed(dataset, splits, seed, chosen, epochs, artifacts, n_train, params)
    if append and out.is_file():
        results = merged(json.loads(out.read_text()), results, dataset, epochs, len(splits.train))
    rows = summarize(results)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_after = os.getloadavg()[0]
    header = (
        f"quality on {dataset} (train {len(splits.train)}, test {len(splits.test)}), "
        f"{seeds} seed(s), {epochs} fine-tune epochs, {when}, {MACHINE}, "
        f"load avg {load_before:.1f} → {load_after:.1f}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": 1,
        "dataset": dataset,
        "date": when,
        "machine": MACHINE,
        "epochs": epochs,
        "n_train": len(splits.train),
        "seeds": seeds,
        "summary": rows,
        "runs": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(payload, indent=2))
    click.echo(markdown(rows, header))

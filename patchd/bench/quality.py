"""``patchd bench quality``: every recipe and baseline on the same splits, seeds and budget.

One process: load the dataset once, then per seed train the incumbent (ERM from scratch, the
"deployed" model) and patch it with each method, all fine-tuning from the same incumbent
weights with the same budget:

- ``erm``: plain fine-tune (the pipeline's ERMTrainer);
- ``gdro``: Sagawa's online Group DRO; ``cgdro``: its class-conditional form (camel's robust
  objective without translations, so a camel row can be read against it); ``dfr``: last
  layer on group-balanced validation data (train + validation when a validation cell is
  scarce); ``jtt``: Just Train Twice (the incumbent's training errors upweighted);
- ``camel``: CycleGAN per class on the true groups + consistency + class-conditional GDRO;
- ``camel-maskpaste``: the same trainer on ``maskpaste`` translations (real pixels moved by a
  learned feature locator);
- ``camel-maskpaste-rows`` / ``translation-oracle-rows``: the same translations (synthesized and
  measured once per seed, shared with the row above) with ``camel.translated_rows``: each kept
  translation also joins its target cell as a labeled row;
- ``gdro-mined`` / ``camel-mined``: ``gdro`` / ``camel-maskpaste`` on groups mined by the
  configured miner with the true groups hidden (fitted on the validation split, whose groups are
  hidden too; epoch selection on the mined validation groups), the production case; mined once
  per seed and shared by both rows, whose ``mining`` column is the precision / recall of the
  mined training-split group against the true minority cells;
- ``diffusion``: route (b) conditional diffusion samples for the minority cells + camel trainer;
- ``defuse``: VAE failure regions (default labels) + the defuse trainer;
- ``translation-oracle``: camel on the exact group swap (colored datasets, whose construction is
  known: the same strokes repainted), the ceiling of any translator;
- ``oracle``: trained from scratch on group-balanced training data (p = 0.5; same images, same
  total epochs), the ceiling.

Every paired translation is measured (``patchd.ml.fidelity``) on the validation split and the
fidelity policy is applied exactly as in a patch run: a class whose translations miss a threshold
trains without the consistency term. The table reports each camel row's fidelity (the minimum
over classes and directions) and which classes were dropped.

``--minority-per-group 10,25,100`` cuts every minority group of the training split (all groups
of a class but its largest) to that many examples (seeded), one table block per count: the
scarce-minority regime where a patch has to beat plain robust training.

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
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

log = logging.getLogger(__name__)

METHODS = (
    "erm",
    "gdro",
    "cgdro",
    "dfr",
    "jtt",
    "camel",
    "camel-maskpaste",
    "camel-maskpaste-rows",
    "gdro-mined",
    "camel-mined",
    "diffusion",
    "defuse",
    "translation-oracle",
    "translation-oracle-rows",
    "oracle",
)
DEFAULT_METHODS = (
    "erm",
    "gdro",
    "cgdro",
    "dfr",
    "jtt",
    "camel",
    "camel-maskpaste",
    "gdro-mined",
    "camel-mined",
    "translation-oracle",
    "oracle",
)
DATASETS = (
    "colored-fmnist",
    "colored-digits",
    "sticker-fmnist",
    "texture-fmnist",
    "image-csv",
    "wilds-metadata",
)
COLORED = ("colored-fmnist", "colored-digits")
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
    minority: int | None = None  # examples per minority group in train (None: as loaded)
    fidelity: dict[str, Any] = field(default_factory=dict)  # camel rows: min over directions
    mining: dict[str, Any] = field(default_factory=dict)  # mined rows: the mined group vs truth


@dataclass
class Bench:
    """Everything one seed's methods share."""

    splits: Any
    incumbent: Any
    seed: int
    epochs: int
    out_dir: Path
    params: dict[str, dict[str, Any]]
    spec: Any  # the DatasetSpec the splits came from
    minority: int | None
    fidelity: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> summary
    judged: dict[str, Any] = field(default_factory=dict)  # method -> translations after the policy
    mined: tuple[Any, Any, dict[str, Any]] | None = None  # (train, val, summary), mined once

    def ctx(self, method: str, stage: str, extra: dict[str, dict[str, Any]] | None = None) -> Any:
        from patchd.abc import StageContext
        from patchd.config import BudgetConfig, PatchConfig

        out = self.out_dir / f"seed{self.seed}" / method / stage
        out.mkdir(parents=True, exist_ok=True)
        params = {k: {**self.params.get(k, {}), **v} for k, v in (extra or {}).items()}
        params = {**self.params, **params}
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


def run_cgdro(b: Bench) -> Any:
    """Class-conditional Group DRO alone: the camel trainer's robust objective without pairs."""
    from patchd.plugins.trainers.gdro import GroupDROTrainer

    ctx = b.ctx("cgdro", "train", {"gdro": {"class_conditional": True}})
    return GroupDROTrainer().train(ctx, b.incumbent, b.splits.train, b.splits.val, None).model


def run_dfr(b: Bench) -> Any:
    from patchd.plugins.trainers.dfr import DFRTrainer

    return (
        DFRTrainer()
        .train(b.ctx("dfr", "train"), b.incumbent, b.splits.train, b.splits.val, None)
        .model
    )


def run_jtt(b: Bench) -> Any:
    from patchd.plugins.trainers.jtt import JTTTrainer

    return (
        JTTTrainer()
        .train(b.ctx("jtt", "train"), b.incumbent, b.splits.train, b.splits.val, None)
        .model
    )


def camel_on(b: Bench, method: str, aug: Any, train: Any, val: Any, rows: bool = False) -> Any:
    """The camel trainer on ``aug`` after the fidelity policy, as a patch run applies it
    (``rows``: with ``camel.translated_rows``)."""
    from patchd.ml.fidelity import FidelityPolicy, judged
    from patchd.plugins.trainers.camel import CamelTrainer

    used, report, dropped = judged(aug, train, val, FidelityPolicy(), seed=b.seed)
    b.fidelity[method] = fidelity_row(report, dropped)
    b.judged[method] = (used, b.fidelity[method])
    log.info("%s seed %d fidelity: %s", method, b.seed, b.fidelity[method])
    extra = {"camel": {"translated_rows": True}} if rows else None
    ctx = b.ctx(method, "train", extra)
    return CamelTrainer().train(ctx, b.incumbent, train, val, used).model


def camel_rows_on(b: Bench, method: str, base: str, make: Callable[[Bench], Any]) -> Any:
    """camel with translated rows on the translations of the seed's ``base`` method (measured
    there; synthesized and measured here when ``base`` did not run first)."""
    from patchd.plugins.trainers.camel import CamelTrainer

    if base not in b.judged:
        make(b)  # synthesizes, measures and stores b.judged[base]
    used, fidelity = b.judged[base]
    b.fidelity[method] = fidelity
    ctx = b.ctx(method, "train", {"camel": {"translated_rows": True}})
    return CamelTrainer().train(ctx, b.incumbent, b.splits.train, b.splits.val, used).model


def fidelity_row(report: Any, dropped: dict[int, str]) -> dict[str, Any]:
    """The table's fidelity columns: minima over classes and directions, and dropped classes."""
    if not report.measured:
        return {"measured": False, "reason": report.reason, "dropped": sorted(dropped)}
    ds = report.directions
    ratio = [d.class_kept / d.class_kept_ceiling for d in ds if d.class_kept_ceiling > 0]
    return {
        "measured": True,
        "flip": min(d.flip_rate for d in ds),
        "tttr": min(d.tttr for d in ds),
        "kept": min(d.class_kept for d in ds),
        "kept_ratio": min(ratio) if ratio else float("nan"),
        "dropped": sorted(dropped),
        "directions": [asdict(d) for d in ds],
    }


def run_camel(b: Bench, method: str = "camel", train: Any = None, val: Any = None) -> Any:
    from patchd.plugins.augmenters.cyclegan import CycleGANAugmenter

    train = b.splits.train if train is None else train
    val = b.splits.val if val is None else val
    aug = CycleGANAugmenter().synthesize(b.ctx(method, "synthesize"), b.incumbent, train)
    return camel_on(b, method, aug, train, val)


def run_camel_maskpaste(
    b: Bench, method: str = "camel-maskpaste", train: Any = None, val: Any = None
) -> Any:
    from patchd.plugins.augmenters.maskpaste import MaskPasteAugmenter

    train = b.splits.train if train is None else train
    val = b.splits.val if val is None else val
    aug = MaskPasteAugmenter().synthesize(b.ctx(method, "synthesize"), b.incumbent, train)
    return camel_on(b, method, aug, train, val)


def run_camel_maskpaste_rows(b: Bench) -> Any:
    return camel_rows_on(b, "camel-maskpaste-rows", "camel-maskpaste", run_camel_maskpaste)


def run_translation_oracle_rows(b: Bench) -> Any:
    return camel_rows_on(b, "translation-oracle-rows", "translation-oracle", run_translation_oracle)


def mined_splits(b: Bench) -> tuple[Any, Any, dict[str, Any]]:
    """Train and validation with the true groups replaced by the configured miner's (fitted on
    validation, groups hidden everywhere), and how the mined training group matches the true
    minority cells; computed once per seed."""
    import torch

    from patchd.bench.mining import precision_recall
    from patchd.config import PatchConfig
    from patchd.plugins.catalog import load_plugin

    if b.mined is not None:
        return b.mined

    def hidden(data: Any) -> Any:
        return data.with_groups(torch.full_like(data.g, -1), ())

    train_h, val_h = hidden(b.splits.train), hidden(b.splits.val)
    name = PatchConfig().miner
    miner = load_plugin("miner", name)
    start = time.monotonic()
    mined_train = miner.mine(b.ctx("mined", "mine"), b.incumbent, train_h, fit_data=val_h)
    mined_val = miner.mine(b.ctx("mined", "mine-val"), b.incumbent, val_h, fit_data=val_h)
    train = train_h.with_groups(mined_train.groups, mined_train.group_names)
    val = val_h.with_groups(mined_val.groups, mined_val.group_names)
    truth = (b.splits.train.g != majority_group(b.splits.train)).numpy()
    members = (mined_train.groups == 1).numpy()
    precision, recall = precision_recall(members, truth)
    summary = {
        "miner": name,
        "precision": precision,
        "recall": recall,
        "members": int(members.sum()),
        "minority": int(truth.sum()),
        "confidence": [round(float(m.confidence or 0.0), 3) for m in mined_train.modes],
        "seconds": round(time.monotonic() - start, 1),
    }
    log.info("mined groups (%s) seed %d: %s", name, b.seed, summary)
    b.mined = (train, val, summary)
    return b.mined


def run_gdro_mined(b: Bench) -> Any:
    """Group DRO on the mined groups (true groups hidden)."""
    from patchd.plugins.trainers.gdro import GroupDROTrainer

    train, val, _ = mined_splits(b)
    return (
        GroupDROTrainer().train(b.ctx("gdro-mined", "train"), b.incumbent, train, val, None).model
    )


def run_camel_mined(b: Bench) -> Any:
    """camel-maskpaste on the mined groups (true groups hidden)."""
    train, val, _ = mined_splits(b)
    return run_camel_maskpaste(b, "camel-mined", train, val)


def majority_group(data: Any) -> Any:
    """Per row, the largest group of its class."""
    import torch

    groups = max(1, len(data.group_names))
    out = torch.zeros_like(data.y)
    for cls in range(data.num_classes):
        counts = torch.bincount(data.g[data.y == cls].clamp(min=0), minlength=groups)
        out[data.y == cls] = int(counts.argmax())
    return out


def run_translation_oracle(b: Bench) -> Any:
    """camel on the exact swap (colored datasets only: the same strokes on the other colour)."""
    from patchd.abc import Augmentation

    if b.spec.kind not in COLORED:
        raise click.UsageError(
            f"translation-oracle needs a dataset whose construction is known ({list(COLORED)}); "
            f"drop it from --methods for {b.spec.kind}"
        )
    swapped = exact_swap(b.splits.train)
    aug = Augmentation(kind="exact-swap", paired={"F": swapped, "G": swapped})
    return camel_on(b, "translation-oracle", aug, b.splits.train, b.splits.val)


def exact_swap(data: Any) -> Any:
    """Colored images repainted with the other background (``x = v + (1 - v) * bg``)."""
    import torch

    from patchd.ml.datasets import PALETTE

    src = PALETTE[data.g][:, :, None, None]
    dst = PALETTE[1 - data.g][:, :, None, None]
    v = ((data.x - src) / (1 - src).clamp(min=1e-6)).clamp(0, 1)
    v = torch.where(src < 0.999, v, torch.full_like(v, float("nan"))).nanmean(1, keepdim=True)
    return (v + (1 - v) * dst).clamp(0, 1)


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
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit, seed_everything

    if b.spec.kind not in (*COLORED, "sticker-fmnist", "texture-fmnist"):
        raise click.UsageError(
            f"the group-balanced oracle regenerates the data with p_train 0.5, which "
            f"{b.spec.kind} cannot; drop 'oracle' from --methods"
        )
    spec = b.spec.model_copy(update={"options": {**b.spec.options, "p_train": 0.5}})
    balanced = load_splits(spec).train
    seed_everything(b.seed)
    model = small_cnn(num_classes=balanced.num_classes, in_channels=balanced.x.shape[1])
    return fit(
        model, balanced, epochs=BASE_EPOCHS + b.epochs, batch_size=64, lr=1e-3, seed=b.seed
    ).model


RUNNERS: dict[str, Callable[[Bench], Any]] = {
    "erm": run_erm,
    "gdro": run_gdro,
    "cgdro": run_cgdro,
    "dfr": run_dfr,
    "jtt": run_jtt,
    "camel": run_camel,
    "camel-maskpaste": run_camel_maskpaste,
    "camel-maskpaste-rows": run_camel_maskpaste_rows,
    "gdro-mined": run_gdro_mined,
    "camel-mined": run_camel_mined,
    "diffusion": run_diffusion,
    "defuse": run_defuse,
    "translation-oracle": run_translation_oracle,
    "translation-oracle-rows": run_translation_oracle_rows,
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


def cut_minority(data: Any, per_group: int | None, seed: int) -> Any:
    """Every group of a class but its largest cut to ``per_group`` rows (seeded); None: as is."""
    import torch

    if per_group is None:
        return data
    keep = torch.ones(len(data), dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    major = majority_group(data)
    for cls in range(data.num_classes):
        for group in range(max(1, len(data.group_names))):
            rows = ((data.y == cls) & (data.g == group) & (major != group)).nonzero()[:, 0]
            if len(rows) > per_group:
                drop = rows[torch.randperm(len(rows), generator=gen)[per_group:]]
                keep[drop] = False
    return data.subset(keep)


def run_seed(
    splits: Any,
    seed: int,
    methods: list[str],
    epochs: int,
    out: Path,
    spec: Any,
    minority: int | None,
    params: dict[str, dict[str, Any]],
) -> list[MethodResult]:
    incumbent, seconds = train_incumbent(splits, seed)
    base = score("incumbent", seed, incumbent, splits.test, seconds)
    tag = f"minority {minority} " if minority is not None else ""
    click.echo(
        f"{tag}seed {seed} incumbent: worst {base.worst:.3f} avg {base.average:.3f} "
        f"({seconds:.0f}s)",
        err=True,
    )
    folder = out / (f"minority{minority}" if minority is not None else "full")
    bench = Bench(splits, incumbent, seed, epochs, folder, params, spec, minority)
    results = [replace(base, minority=minority)]
    for method in methods:
        start = time.monotonic()
        model = RUNNERS[method](bench)
        r = score(method, seed, model, splits.test, time.monotonic() - start)
        mining = bench.mined[2] if method.endswith("-mined") and bench.mined else {}
        r = replace(r, minority=minority, fidelity=bench.fidelity.get(method, {}), mining=mining)
        click.echo(
            f"{tag}seed {seed} {method}: worst {r.worst:.3f} avg {r.average:.3f} "
            f"gap {r.gap:.3f} ({r.seconds:.0f}s) {r.cells} {_fidelity_text(r.fidelity)}"
            f"{_mining_text(r.mining)}",
            err=True,
        )
        results.append(r)
    return results


def _fidelity_text(f: dict[str, Any]) -> str:
    if not f:
        return ""
    if not f.get("measured"):
        return f"fidelity unmeasured ({f.get('reason', '')})"
    return (
        f"fidelity flip {f['flip']:.2f} tttr {f['tttr']:.2f} kept {f['kept']:.2f} "
        f"dropped {f['dropped']}"
    )


def _mining_text(m: dict[str, Any]) -> str:
    if not m:
        return ""
    return (
        f" mined group P {m['precision']:.2f} / R {m['recall']:.2f} "
        f"({m['members']} members, {m['minority']} true; {m['seconds']:.0f}s)"
    )


def summarize(results: list[MethodResult]) -> list[dict[str, Any]]:
    rows = []
    keys = dict.fromkeys((r.minority, r.method) for r in results)
    for minority, method in keys:
        rs = [r for r in results if r.method == method and r.minority == minority]
        row: dict[str, Any] = {"method": method, "minority": minority, "seeds": len(rs)}
        for key in ("worst", "average", "gap", "seconds"):
            vals = [getattr(r, key) for r in rs]
            row[key] = statistics.fmean(vals)
            row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        measured = [r.fidelity for r in rs if r.fidelity.get("measured")]
        for key in ("flip", "tttr", "kept"):
            row[key] = statistics.fmean(f[key] for f in measured) if measured else None
        row["dropped"] = sum(len(r.fidelity.get("dropped", [])) for r in rs)
        mined = [r.mining for r in rs if r.mining]
        for key in ("precision", "recall"):
            row[f"mined_{key}"] = statistics.fmean(m[key] for m in mined) if mined else None
        rows.append(row)
    return rows


def merged(old: dict[str, Any], new: list[MethodResult], key: dict[str, Any]) -> list[MethodResult]:
    """Earlier runs from ``old`` (same dataset and budget) plus ``new``."""
    if {k: old.get(k) for k in key} != key:
        raise click.UsageError("--append needs the same dataset, --epochs and --n-train as --out")
    fresh = {(r.method, r.seed, r.minority) for r in new}
    kept = [
        MethodResult(**r)
        for r in old.get("runs", [])
        if (r["method"], r["seed"], r.get("minority")) not in fresh
    ]
    return kept + new


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| minority / group | method | worst-group | average | gap | fidelity: flip / tttr / "
        "class kept (min) | classes dropped | mined group P / R | wall s | seeds |",
        "|---:|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        fidelity = (
            f"{_cell(r['flip'])} / {_cell(r['tttr'])} / {_cell(r['kept'])}"
            if r.get("flip") is not None
            else "–"
        )
        mined = (
            f"{r['mined_precision']:.2f} / {r['mined_recall']:.2f}"
            if r.get("mined_precision") is not None
            else "–"
        )
        minority = "as loaded" if r["minority"] is None else str(r["minority"])
        lines.append(
            f"| {minority} | {r['method']} | {r['worst']:.3f} ± {r['worst_std']:.3f} "
            f"| {r['average']:.3f} ± {r['average_std']:.3f} | {r['gap']:.3f} ± {r['gap_std']:.3f} "
            f"| {fidelity} | {r['dropped']} | {mined} "
            f"| {r['seconds']:.0f} ± {r['seconds_std']:.0f} "
            f"| {r['seeds']} |"
        )
    return "\n".join(lines)


def parse_counts(text: str | None) -> list[int | None]:
    if not text:
        return [None]
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of counts", param_hint="--minority-per-group"
        ) from None
    if not counts or min(counts) < 2:
        raise click.BadParameter("counts must be >= 2", param_hint="--minority-per-group")
    return list(counts)


def dataset_spec(
    dataset: str | None, config_path: Path | None, data: tuple[str, ...], n_train: int | None
) -> Any:
    """The dataset: ``data.train`` of a config file, or ``--dataset`` with ``--data`` keys."""
    from patchd.config import DatasetSpec, load_config

    fields: dict[str, Any] = {}
    if config_path is not None:
        fields = load_config(config_path).data.train.model_dump()
    if dataset is not None:
        fields["kind"] = dataset
    for key, values in (
        parse_overrides(tuple(f"data.{item}" for item in data)).get("data", {}).items()
    ):
        fields[key] = values
    if n_train is not None:
        fields["n_train"] = n_train
    fields.setdefault("kind", "colored-fmnist")
    try:
        return DatasetSpec(**fields)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--data") from None


@click.command()
@click.option("--dataset", type=click.Choice(list(DATASETS)), default=None)
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Take the dataset from this patchd.yaml's data.train (--dataset/--data override it).",
)
@click.option(
    "--data",
    multiple=True,
    metavar="KEY=VALUE",
    help="A data.train key (JSON value), e.g. --data root=/srv/imgs --data csv=/srv/meta.csv.",
)
@click.option(
    "--minority-per-group",
    default=None,
    help="Cut each minority group of the training split to N examples; a list runs a sweep.",
)
@click.option("--seeds", type=int, default=3, show_default=True, help="Seeds 0..N-1.")
@click.option("--first-seed", type=int, default=0, show_default=True)
@click.option(
    "--methods",
    default=",".join(DEFAULT_METHODS),
    show_default=True,
    help=f"Comma-separated subset of {', '.join(METHODS)}.",
)
@click.option(
    "--epochs",
    type=int,
    default=15,
    show_default=True,
    help="Fine-tuning epochs per method (camel needs ~15; gdro is as good at 3).",
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
@click.option("--out", type=click.Path(path_type=Path), default=None)
def quality(
    dataset: str | None,
    config_path: Path | None,
    data: tuple[str, ...],
    minority_per_group: str | None,
    seeds: int,
    first_seed: int,
    methods: str,
    epochs: int,
    n_train: int | None,
    overrides: tuple[str, ...],
    append: bool,
    out: Path | None,
) -> None:
    """Worst-group / average accuracy of every recipe and baseline on the same splits."""
    import torch

    from patchd.ml.datasets import load_splits

    torch.set_num_threads(int(os.environ.get("PATCHD_BENCH_THREADS", "1")))
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.BadParameter(
            f"unknown methods {unknown}; choose from {list(METHODS)}", param_hint="--methods"
        )
    spec = dataset_spec(dataset, config_path, data, n_train)
    counts = parse_counts(minority_per_group)
    params = bench_params(spec.kind)
    for plugin, values in parse_overrides(overrides).items():
        params[plugin] = {**params.get(plugin, {}), **values}
    out = out or Path(f"benchmarks/results/quality-{spec.kind}.json")
    load_before = os.getloadavg()[0]
    splits = load_splits(spec)
    artifacts = out.parent / f"quality-{spec.kind}"
    results: list[MethodResult] = []
    for count in counts:
        for seed in range(first_seed, first_seed + seeds):
            cut = replace(splits, train=cut_minority(splits.train, count, seed))
            results += run_seed(cut, seed, chosen, epochs, artifacts, spec, count, params)
    key = {"dataset": spec.kind, "epochs": epochs, "n_train": len(splits.train)}
    if append and out.is_file():
        results = merged(json.loads(out.read_text()), results, key)
    rows = summarize(results)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_after = os.getloadavg()[0]
    header = (
        f"quality on {spec.kind} (train {len(splits.train)} before cuts, val {len(splits.val)}, "
        f"test {len(splits.test)}), {seeds} seed(s), {epochs} fine-tune epochs, {when}, "
        f"{MACHINE}, load avg {load_before:.1f} → {load_after:.1f}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema": 2,
        **key,
        "spec": spec.model_dump(mode="json"),
        "date": when,
        "machine": MACHINE,
        "seeds": seeds,
        "summary": rows,
        "runs": [asdict(r) for r in results],
    }
    out.write_text(json.dumps(payload, indent=2, default=str))
    click.echo(markdown(rows, header))

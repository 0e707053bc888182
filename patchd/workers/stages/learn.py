"""The ML stages after ``collect``: mine → synthesize → train → evaluate.

Each reads the verified outputs of earlier stages (``<run_dir>/<stage>/``), runs the configured
plugin (:mod:`patchd.plugins.catalog`) and writes its files into ``out`` (the temp dir that
:mod:`patchd.workers.artifacts` publishes). Results are small JSON-able dicts.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchd.exceptions import StageError
from patchd.plugins.catalog import load_plugin
from patchd.workers import artifacts, runtime

if TYPE_CHECKING:
    import torch

    from patchd.abc import Augmentation, MiningResult, StageContext
    from patchd.config import Config
    from patchd.ml.data import ImageSet
    from patchd.runs.recipe import Recipe


def stage_input(run_dir: Path, stage: str) -> Path:
    """The verified output dir of an earlier stage (IntegrityError when tampered with)."""
    directory = run_dir / stage
    if not directory.is_dir():
        raise StageError(f"the {stage} output {directory} is missing; re-run the run from {stage}")
    artifacts.verify(directory)
    return directory


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 6)


def _copy_into(src: Path | None, dst: Path) -> bool:
    if src is None or not Path(src).is_file():
        return False
    if Path(src).resolve() != dst.resolve():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return True


def grouped_train(run_dir: Path) -> ImageSet:
    """The collected train set with the mined (or true) subgroup assignment."""
    from safetensors.torch import load_file

    train = artifacts.load_imageset(stage_input(run_dir, "collect") / "train.safetensors")
    mined = stage_input(run_dir, "mine")
    groups = load_file(str(mined / "groups.safetensors"))["groups"]
    names = tuple(json.loads((mined / "mining.json").read_text())["group_names"])
    return train.with_groups(groups, names)


# --- mine ------------------------------------------------------------------------------------

PRODUCTION_PREFIX = "prod:"  # ids of labeled production events (see stages.collect)


def mining_fit_set(train: ImageSet, val: ImageSet) -> ImageSet:
    """What the miner fits on: the validation split plus the labeled production events that
    ``collect`` put into train (held-out labeled data whose errors the incumbent has not
    memorized); the training split's own rows only get scored. Group names are dropped when the
    two disagree (the miner needs the labels and predictions, not the groups)."""
    import torch

    from patchd.workers.stages.collect import concat

    prod = torch.tensor([i.startswith(PRODUCTION_PREFIX) for i in train.ids], dtype=torch.bool)
    if not bool(prod.any()):
        return val
    extra = train.subset(prod)
    if tuple(extra.group_names[: len(val.group_names)]) != tuple(val.group_names):
        unknown = torch.full_like(val.g, -1)
        val = val.with_groups(unknown, ())
        extra = extra.with_groups(torch.full_like(extra.g, -1), ())
    return concat(val, extra)


def mine(
    *, run_id: str, run_dir: Path, out: Path, recipe: Recipe, config: Config
) -> dict[str, Any]:
    from safetensors.torch import save_file

    collected = stage_input(run_dir, "collect")
    train = artifacts.load_imageset(collected / "train.safetensors")
    held = mining_fit_set(train, artifacts.load_imageset(collected / "val.safetensors"))
    model = runtime.load_incumbent(recipe, config)
    ctx = runtime.make_context(recipe, config, "mine", out, run_id)
    runtime.seed_everything(ctx.seed)
    miner = load_plugin("miner", recipe.miner)
    result: MiningResult = miner.mine(ctx, model.to(ctx.device), train, fit_data=held)
    if result.groups.shape != (len(train),):
        raise StageError(
            f"miner {recipe.miner!r} returned {tuple(result.groups.shape)} groups "
            f"for {len(train)} training examples"
        )
    tensors = {
        "groups": result.groups.to("cpu").long().contiguous(),
        "hardness": result.hardness.to("cpu").float().contiguous(),
    }
    if result.membership is not None:
        tensors["membership"] = result.membership.to("cpu").float().contiguous()
    save_file(tensors, str(out / "groups.safetensors"))
    png = _copy_into(result.report_png, out / "failure_report.png")
    if (
        result.report_json is not None
        and Path(result.report_json).parent.resolve() != out.resolve()
    ):
        _copy_into(result.report_json, out / "failure_report.json")
    body = {
        "modes": [asdict(m) for m in result.modes],
        "group_names": list(result.group_names),
        "mined": result.mined,
        "miner": recipe.miner,
        "n_fit": len(held),
        "fit_on": "val + labeled production events in train",
    }
    (out / "mining.json").write_text(json.dumps(body, indent=2))
    pseudo = _write_pseudo_groups(result, out, run_id, recipe)
    return {
        "modes": len(result.modes),
        "mined": result.mined,
        "report_png": png,
        "group_names": list(result.group_names),
        "strength": [round(m.strength, 4) for m in result.modes],
        "pseudo_groups": pseudo,
    }


def _write_pseudo_groups(
    result: MiningResult, out: Path, run_id: str, recipe: Recipe
) -> int | None:
    """``mined_groups.json`` (the monitor's ``mined`` pseudo-groups) when the miner has
    membership models; the number of mined classes it holds, None when not written."""
    from dataclasses import replace

    from patchd.monitor.mined import FILE

    if result.pseudo_groups is None:
        return None
    mined = replace(
        result.pseudo_groups,
        model=recipe.model,
        run_id=run_id,
        incumbent_sha256=recipe.incumbent_sha256,
    )
    mined.write(out / FILE)
    return len(mined.directions)


# --- synthesize ------------------------------------------------------------------------------


def synthesize(
    *, run_id: str, run_dir: Path, out: Path, recipe: Recipe, config: Config
) -> dict[str, Any]:
    train = grouped_train(run_dir)
    model = runtime.load_incumbent(recipe, config)
    ctx = runtime.make_context(recipe, config, "synthesize", out, run_id)
    runtime.seed_everything(ctx.seed)
    aug: Augmentation = load_plugin("augmenter", recipe.augmenter).synthesize(
        ctx, model.to(ctx.device), train
    )
    aug = _with_local_previews(aug, out / "previews")
    aug, fidelity = _judged(aug, train, run_dir, out, config, ctx)
    artifacts.save_augmentation(
        aug, out / "augmentation.safetensors", train.x, config.artifacts.augmentation_dtype
    )
    return {
        "kind": aug.kind,
        "paired": sorted(aug.paired),
        "extra": len(aug.extra) if aug.extra is not None else 0,
        "previews": len(aug.previews),
        "fidelity": fidelity,
    }


def _judged(
    aug: Augmentation,
    train: ImageSet,
    run_dir: Path,
    out: Path,
    config: Config,
    ctx: StageContext,
) -> tuple[Augmentation, dict[str, Any] | None]:
    """Paired translations measured on the validation split, the fidelity policy applied.

    Writes ``fidelity.json``; returns the augmentation the trainer gets (dropped classes set to
    the identity) and the summary for the stage result (None when nothing was paired).
    """
    from patchd.ml.fidelity import FidelityPolicy, judged

    policy_config = config.patch.fidelity
    if not aug.paired or not policy_config.enabled:
        return aug, None
    val = artifacts.load_imageset(stage_input(run_dir, "collect") / "val.safetensors")
    policy = FidelityPolicy.from_mapping(policy_config)
    used, report, dropped = judged(aug, train, val, policy, seed=ctx.seed, device=ctx.device)
    (out / "fidelity.json").write_text(report.to_json())
    if not report.measured:
        ctx.log.warning("run %s: synthesis fidelity not measured: %s", ctx.run_id, report.reason)
    for cls, why in sorted(dropped.items()):
        ctx.log.warning(
            "run %s: class %s translations not used (consistency off, class-conditional GDRO "
            "there): %s",
            ctx.run_id,
            train.class_names[cls],
            why,
        )
    return used, fidelity_summary(report, dropped)


def fidelity_summary(report: Any, dropped: dict[int, str]) -> dict[str, Any]:
    """The small JSON of the stage result: what serve exports as metrics."""
    return {
        "measured": report.measured,
        "reason": report.reason,
        "dropped": {str(c): why for c, why in dropped.items()},
        "directions": [
            {
                "cls": d.cls,
                "source": d.source,
                "target": d.target,
                "flip_rate": d.flip_rate,
                "tttr": d.tttr,
                "class_kept": d.class_kept,
                "class_kept_ceiling": d.class_kept_ceiling,
                "kept": d.kept,
            }
            for d in report.directions
        ],
    }


def _with_local_previews(aug: Augmentation, folder: Path) -> Augmentation:
    """Previews copied under ``folder`` so they are part of the stage's manifest."""
    from dataclasses import replace

    local = []
    for i, path in enumerate(aug.previews):
        dst = folder / (Path(path).name or f"preview-{i}.png")
        if _copy_into(Path(path), dst):
            local.append(dst)
    return replace(aug, previews=tuple(local))


# --- train -----------------------------------------------------------------------------------


NO_IMPROVEMENT = "no_improvement"  # the train/evaluate result ``outcome`` when nothing beat it


def train(
    *, run_id: str, run_dir: Path, out: Path, recipe: Recipe, config: Config
) -> dict[str, Any]:
    """Fine-tune; when the kept model is the incumbent itself (no epoch beat it on validation),
    no weights are written and the result's ``outcome`` is :data:`NO_IMPROVEMENT`."""
    from patchd.ml.models import save_weights

    data = grouped_train(run_dir)
    val = artifacts.load_imageset(stage_input(run_dir, "collect") / "val.safetensors")
    aug = artifacts.load_augmentation(
        stage_input(run_dir, "synthesize") / "augmentation.safetensors", data.x
    )
    model = runtime.load_incumbent(recipe, config)
    ctx = runtime.make_context(recipe, config, "train", out, run_id)
    runtime.seed_everything(ctx.seed)
    result = load_plugin("trainer", recipe.trainer).train(ctx, model.to(ctx.device), data, val, aug)
    (out / "history.json").write_text(json.dumps(list(result.history), indent=2))
    summary: dict[str, Any] = {
        "epochs": result.epochs,
        "seconds": round(result.seconds, 3),
        "trainer": recipe.trainer,
    }
    if same_weights(result.model, model):
        ctx.log.warning("run %s: %s", run_id, no_improvement_message(result.history))
        return {
            **summary,
            "sha256": None,
            "outcome": NO_IMPROVEMENT,
            "message": no_improvement_message(result.history),
        }
    sha = save_weights(result.model.to("cpu"), out / "model.safetensors")
    return {**summary, "sha256": sha, "outcome": "candidate"}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """True when both modules hold bit-identical tensors under the same names."""
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa
    )


def no_improvement_message(history: tuple[dict[str, float], ...] | list[dict[str, float]]) -> str:
    """What the run found, from the trainer's per-epoch validation history."""
    base = "no fine-tuning epoch beat the incumbent on validation; incumbent kept"
    if not history or "val_worst" not in history[0]:
        return base
    start = history[0]
    tried = [h for h in history[1:] if "val_worst" in h]
    best = max(tried, key=lambda h: (h["val_worst"], h.get("val_avg", 0.0)), default=None)
    found = f"incumbent val worst-group {start['val_worst']:.3f}"
    if best is not None:
        found += (
            f", best of {len(tried)} epoch(s) {best['val_worst']:.3f} (epoch {int(best['epoch'])})"
        )
    return f"{base} ({found})"


# --- evaluate --------------------------------------------------------------------------------


def evaluate(
    *, run_id: str, run_dir: Path, out: Path, recipe: Recipe, config: Config
) -> dict[str, Any]:
    from patchd.ml.evaluate import evaluate_pair

    collected = stage_input(run_dir, "collect")
    trained = artifacts.verify(stage_input(run_dir, "train"))
    if trained.result.get("outcome") == NO_IMPROVEMENT:
        return {
            "outcome": NO_IMPROVEMENT,
            "message": trained.result.get("message", "incumbent kept"),
            "candidate_sha256": None,
            "incumbent_sha256": recipe.incumbent_sha256,
        }
    heldout = artifacts.load_imageset(collected / "heldout.safetensors")
    train_set = artifacts.load_imageset(collected / "train.safetensors")
    incumbent = runtime.load_incumbent(recipe, config)
    candidate = runtime.build_model(config)
    runtime.load_weights(
        candidate, run_dir / "train" / "model.safetensors", trained.result.get("sha256", "")
    )
    report = evaluate_pair(
        incumbent.eval(),
        candidate.eval(),
        heldout,
        train_mix=train_set,
        confidence=config.gate.confidence,
        n_min=config.gate.n_min,
    )
    (out / "evaluation.json").write_text(report.to_json())
    return {
        "outcome": "candidate",
        "candidate_sha256": trained.result.get("sha256"),
        "incumbent_sha256": recipe.incumbent_sha256,
        "n_heldout": len(heldout),
        "incumbent_worst_group": _finite(report.incumbent.worst_group_accuracy),
        "candidate_worst_group": _finite(report.candidate.worst_group_accuracy),
        "incumbent_average": _finite(report.incumbent.average_pooled),
        "candidate_average": _finite(report.candidate.average_pooled),
    }

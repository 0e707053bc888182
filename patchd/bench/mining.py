"""``patchd bench mining``: does the miner recover the failing *subgroup* (not only its errors)?

Per seed: the dataset is loaded, a small CNN is trained with plain ERM (it learns the shortcut),
and every method is fitted on the **validation** split with the groups hidden, then scores the
**training** split (what Group DRO and the consistency loss balance) and the **test** split.
Truth, per class: the class's smallest cell in the training split (the under-represented group,
e.g. the minority colour); k = its size in the scored split, so P@k = R@k.

Methods, side by side on the same model, embeddings and splits:

- ``subgroup``: :class:`patchd.plugins.miners.subgroup.SubgroupMiner` (the default miner) as the
  mine stage runs it (fit on val, score the split, pooled spatial features); its membership
  score, and the group it hands downstream (precision / recall of the thresholded members);
- ``penultimate``: the same miner on the penultimate features (``embedding: penultimate``);
- ``probe``: not a miner but a ceiling of each embedding: a balanced logistic regression fitted
  on val with the *true* groups, P@k of its score (``probe_pooled_pk``, ``probe_penultimate_pk``);
- ``svm``: :class:`patchd.plugins.miners.svm.SVMDirectionMiner` (correct-vs-wrong SVM, Jain et
  al.), fitted on val, its signed decision value;
- peers, when ``--peer-python`` names an environment that has them
  (``benchmarks/peers/setup-peers.sh``), run in that process on the same model's embeddings
  (penultimate and pooled), fitted on val: ``domino``, the slicer Domino 0.1.5
  (``domino.DominoSlicer``, its best slice per class picked with the truth;
  ``benchmarks/peers/domino_slices.py``), and ``fd``, the authors' package failure-directions
  0.1.3 (``SVMFitter``, the correct-vs-wrong SVM; ``benchmarks/peers/fd_svm.py``);
- ``loss``: the model's own loss on the scored split (ranking by -margin);
- ``errors``: the error mask (hard = predicted wrong), as a group (precision / recall) and as a
  binary score (AUROC).

Datasets: ``colored-fmnist`` (Debian dataset-fashion-mnist), ``sticker-fmnist`` (a random-position
sticker at T-shirt/top vs shirt, :mod:`patchd.plugins.datasets.sticker_fmnist`),
``texture-fmnist`` (stripes on the garment, :mod:`patchd.plugins.datasets.texture_fmnist`)
and ``image-csv`` (the user's folder + CSV with the same keys as ``data.train``; it needs group
columns, which define the truth). ``--make-image-csv DIR`` writes a sticker set (pullover vs coat)
as PNGs + ``labels.csv`` to try the image-CSV path.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from patchd.abc import StageContext
    from patchd.config import DatasetSpec
    from patchd.ml.data import ImageSet, Splits

MACHINE = "2-core x86_64, no GPU"
METHODS = ("subgroup", "penultimate", "domino", "fd", "svm", "loss", "errors")
PEERS = Path(__file__).resolve().parents[2] / "benchmarks" / "peers"
PEER_SCRIPTS = {"domino": PEERS / "domino_slices.py", "fd": PEERS / "fd_svm.py"}


@dataclass(frozen=True)
class Row:
    dataset: str
    seed: int
    split: str
    cls: int
    n: int
    k: int  # true minority cell size in the scored split
    # P@k and AUROC of each method's score; group precision / recall where a method hands a group
    subgroup_pk: float
    subgroup_auroc: float
    subgroup_group_p: float
    subgroup_group_r: float
    subgroup_confidence: float
    penultimate_pk: float
    penultimate_auroc: float
    penultimate_group_p: float
    penultimate_group_r: float
    probe_pooled_pk: float
    probe_penultimate_pk: float
    domino_pk: float  # NaN when the peer was not run
    domino_pooled_pk: float
    fd_pk: float
    fd_pooled_pk: float
    svm_pk: float
    svm_auroc: float
    svm_group_p: float
    svm_group_r: float
    loss_pk: float
    loss_auroc: float
    errors_p: float
    errors_r: float
    errors_auroc: float


def precision_at_k(score: np.ndarray, truth: np.ndarray) -> float:
    """Share of true members among the k highest scores, k = number of true members."""
    k = int(truth.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-score, kind="stable")[:k]
    return float(truth[top].mean())


def auroc(score: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, score))


def precision_recall(group: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Precision and recall of the boolean ``group`` against the boolean ``truth``."""
    tp = int((group & truth).sum())
    return tp / max(1, int(group.sum())), tp / max(1, int(truth.sum()))


def minority_cells(train: ImageSet) -> dict[int, int]:
    """Per class, the group index of its smallest cell in the training split."""
    y, g = train.y.numpy(), train.g.numpy()
    out = {}
    for c in range(train.num_classes):
        counts = np.bincount(g[y == c], minlength=len(train.group_names))
        present = np.flatnonzero(counts > 0)
        if len(present) < 2:
            continue  # a class with one group has no minority cell
        out[c] = int(present[np.argmin(counts[present])])
    return out


def _hide(data: ImageSet) -> ImageSet:
    import torch

    return data.with_groups(torch.full_like(data.g, -1), ())


def _margin(model: nn.Module, data: ImageSet) -> tuple[np.ndarray, np.ndarray]:
    from patchd.ml.models import predict

    probs = predict(model, data.x).numpy()
    y = data.y.numpy()
    true_p = probs[np.arange(len(y)), y]
    others = probs.copy()
    others[np.arange(len(y)), y] = -np.inf
    return true_p - others.max(1), probs.argmax(1) != y


def _rows(
    dataset: str, seed: int, split: str, data: ImageSet, model: nn.Module, results: dict[str, Any]
) -> list[Row]:
    margin, wrong = _margin(model, data)
    y, g = data.y.numpy(), data.g.numpy()
    sub, pen, svm = results["subgroup"], results["penultimate"], results["svm"]
    out = []
    for c, cell in results["cells"].items():
        r = y == c
        truth = g[r] == cell
        s_score, v_score = sub.hardness.numpy()[r], svm.hardness.numpy()[r]
        p_score = pen.hardness.numpy()[r]
        sg_p, sg_r = precision_recall(sub.groups.numpy()[r] == 1, truth)
        pg_p, pg_r = precision_recall(pen.groups.numpy()[r] == 1, truth)
        probes = results["probes"][split][c]
        sv_p, sv_r = precision_recall(svm.groups.numpy()[r] == 1, truth)
        e_p, e_r = precision_recall(wrong[r], truth)
        out.append(
            Row(
                dataset=dataset,
                seed=seed,
                split=split,
                cls=c,
                n=int(r.sum()),
                k=int(truth.sum()),
                subgroup_pk=precision_at_k(s_score, truth),
                subgroup_auroc=auroc(s_score, truth),
                subgroup_group_p=sg_p,
                subgroup_group_r=sg_r,
                subgroup_confidence=float(sub.modes[c].confidence or 0.0),
                penultimate_pk=precision_at_k(p_score, truth),
                penultimate_auroc=auroc(p_score, truth),
                penultimate_group_p=pg_p,
                penultimate_group_r=pg_r,
                probe_pooled_pk=probes["pooled"],
                probe_penultimate_pk=probes["penultimate"],
                domino_pk=peer(results, "domino", split, c, "penultimate"),
                domino_pooled_pk=peer(results, "domino", split, c, "pooled"),
                fd_pk=peer(results, "fd", split, c, "penultimate"),
                fd_pooled_pk=peer(results, "fd", split, c, "pooled"),
                svm_pk=precision_at_k(v_score, truth),
                svm_auroc=auroc(v_score, truth),
                svm_group_p=sv_p,
                svm_group_r=sv_r,
                loss_pk=precision_at_k(-margin[r], truth),
                loss_auroc=auroc(-margin[r], truth),
                errors_p=e_p,
                errors_r=e_r,
                errors_auroc=auroc(wrong[r].astype(float), truth),
            )
        )
    return out


def pen_ctx(ctx: StageContext) -> StageContext:
    """``ctx`` with the subgroup miner set to mine on the penultimate features (own out dir)."""
    from dataclasses import replace

    out = ctx.out_dir / "penultimate"
    out.mkdir(exist_ok=True)
    params = {**ctx.params.params, "subgroup": {"embedding": "penultimate"}}
    return replace(ctx, out_dir=out, params=ctx.params.model_copy(update={"params": params}))


Embedded = dict[str, dict[str, np.ndarray]]  # split -> embedding name -> [N, D]


def embed_splits(model: nn.Module, s: Splits) -> Embedded:
    """Penultimate and pooled embeddings of val, train and test (pooled = penultimate for a
    model without a spatial activation)."""
    from patchd.ml.models import features, pooled_features

    out: Embedded = {}
    for split in ("val", "train", "test"):
        x = getattr(s, split).x
        pen = features(model, x).numpy()
        pooled = pooled_features(model, x)
        out[split] = {"penultimate": pen, "pooled": pen if pooled is None else pooled.numpy()}
    return out


def probe_ceilings(
    emb: Embedded, s: Splits, cells: dict[int, int]
) -> dict[str, dict[int, dict[str, float]]]:
    """P@k of a balanced logistic regression fitted on val with the *true* groups, per scored
    split, class and embedding: what any miner in that embedding could reach at best."""
    import warnings

    from sklearn.linear_model import LogisticRegression

    from patchd.plugins.miners.directions import Preprocessor

    out: dict[str, dict[int, dict[str, float]]] = {"train": {}, "test": {}}
    for space in ("pooled", "penultimate"):
        pre = Preprocessor.fit(emb["val"][space])
        zv, yv, gv = pre(emb["val"][space]), s.val.y.numpy(), s.val.g.numpy()
        for split in ("train", "test"):
            data = getattr(s, split)
            z, y, g = pre(emb[split][space]), data.y.numpy(), data.g.numpy()
            for c, cell in cells.items():
                clf = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    clf.fit(zv[yv == c], gv[yv == c] == cell)
                score = clf.decision_function(z[y == c])
                out[split].setdefault(c, {})[space] = precision_at_k(score, g[y == c] == cell)
    return out


PeerScores = dict[str, dict[tuple[str, int, str], float]]  # peer -> (split, class, emb) -> P@k


def peer(results: dict[str, Any], name: str, split: str, cls: int, emb: str) -> float:
    return float(results["peers"].get(name, {}).get((split, cls, emb), float("nan")))


def run_peers(
    python: Path, model: nn.Module, emb: Embedded, s: Splits, cells: dict[int, int]
) -> PeerScores:
    """Each peer's P@k per (split, class, embedding), from the peer environment's processes on
    this model's embeddings (see the scripts in ``benchmarks/peers``)."""
    import subprocess

    from patchd.ml.models import predict

    missing = [str(p) for p in PEER_SCRIPTS.values() if not p.is_file()]
    if missing:
        raise click.ClickException(
            f"--peer-python needs the peer scripts of a source checkout; missing: {missing}"
        )
    arrays: dict[str, np.ndarray] = {"cells": np.array(sorted(cells.items()), np.int64)}
    for split in ("val", "train", "test"):
        data: ImageSet = getattr(s, split)
        arrays[f"{split}_y"], arrays[f"{split}_g"] = data.y.numpy(), data.g.numpy()
        arrays[f"{split}_probs"] = predict(model, data.x).numpy().astype(np.float64)
        for name, z in emb[split].items():
            arrays[f"{split}_emb_{name}"] = z
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(src, **arrays)  # type: ignore[arg-type]  # the stub types **kwds by allow_pickle
        out: PeerScores = {}
        for name, script in PEER_SCRIPTS.items():
            done = subprocess.run(
                [str(python), str(script), str(src), str(dst)],
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
            if done.returncode != 0:
                raise click.ClickException(
                    f"the {name} peer failed ({python} {script.name}, exit {done.returncode}): "
                    f"{done.stderr.strip()[-2000:]}"
                )
            rows = json.loads(dst.read_text())["rows"]
            out[name] = {(r["split"], int(r["cls"]), r["embedding"]): float(r["pk"]) for r in rows}
    return out


def _spec(dataset: str, seed: int, n_train: int | None, extra: dict[str, Any]) -> DatasetSpec:
    from patchd.config import DatasetSpec

    return DatasetSpec(kind=dataset, seed=seed, n_train=n_train, **extra)


def run_seed(
    dataset: str,
    seed: int,
    n_train: int | None,
    epochs: int,
    extra: dict[str, Any],
    peer_python: Path | None = None,
) -> dict[str, Any]:
    from patchd.abc import StageContext
    from patchd.config import PatchConfig
    from patchd.ml.datasets import load_splits
    from patchd.ml.evaluate import evaluate_model
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit, seed_everything
    from patchd.plugins.miners.subgroup import SubgroupMiner
    from patchd.plugins.miners.svm import SVMDirectionMiner

    s: Splits = load_splits(_spec(dataset, seed, n_train, extra))
    cells = minority_cells(s.train)
    if not cells:
        raise click.UsageError(f"{dataset}: no class has two groups; the bench needs group labels")
    seed_everything(seed)
    model = small_cnn(num_classes=s.train.num_classes, in_channels=int(s.train.x.shape[1]))
    t0 = time.monotonic()
    fit(model, s.train, epochs=epochs, batch_size=64, lr=1e-3, seed=seed)
    train_s = time.monotonic() - t0
    erm = evaluate_model(model, s.test, s.train)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    reports: dict[str, str] = {}
    val = _hide(s.val)
    emb = embed_splits(model, s)
    probes = probe_ceilings(emb, s, cells)
    t = time.monotonic()
    peers = run_peers(peer_python, model, emb, s, cells) if peer_python else {}
    seconds["peers"] = time.monotonic() - t
    with tempfile.TemporaryDirectory() as tmp:
        for split, data in (("train", s.train), ("test", s.test)):
            out = Path(tmp) / split
            out.mkdir()
            ctx = StageContext("bench", "mine", out, PatchConfig(), seed=seed)
            t = time.monotonic()
            sub = SubgroupMiner().mine(ctx, model, _hide(data), fit_data=val)
            seconds[f"subgroup:{split}"] = time.monotonic() - t
            reports[split] = _summary(json.loads(Path(str(sub.report_json)).read_text()))
            t = time.monotonic()
            pen = SubgroupMiner().mine(pen_ctx(ctx), model, _hide(data), fit_data=val)
            seconds[f"penultimate:{split}"] = time.monotonic() - t
            t = time.monotonic()
            svm = SVMDirectionMiner().mine(ctx, model, _hide(data), fit_data=val)
            seconds[f"svm:{split}"] = time.monotonic() - t
            results = {
                "subgroup": sub,
                "penultimate": pen,
                "svm": svm,
                "cells": cells,
                "probes": probes,
                "peers": peers,
            }
            rows += _rows(dataset, seed, split, data, model, results)
    return {
        "seed": seed,
        "n_train": len(s.train),
        "n_val": len(s.val),
        "n_test": len(s.test),
        "train_seconds": round(train_s, 1),
        "mine_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "erm_test_cells": {c.key: round(c.accuracy, 4) for c in erm.cells},
        "erm_test_worst_group": round(erm.worst_group_accuracy, 4),
        "report": reports,
        "rows": [asdict(r) for r in rows],
    }


def _summary(report: dict[str, Any]) -> str:
    lines = []
    for c in report["classes"]:
        conf = c.get("confidence")
        lines.append(
            f"- {c['name']}: group size {c['n_hard']} ({(c.get('share') or 0):.1%}), "
            f"confidence {conf if conf is None else round(conf, 3)}, {c['status']}: "
            f"{c['description']}"
        )
    return "\n".join(lines)


def _fmt(values: list[float]) -> str:
    arr = np.array([v for v in values if not np.isnan(v)], dtype=float)
    if len(arr) == 0:
        return "n/a"
    return f"{arr.mean():.3f}" if len(arr) == 1 else f"{arr.mean():.3f} ± {arr.std():.3f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: mean ± std over seeds per (dataset, split, class)."""
    keys = sorted({(r["dataset"], r["split"], r["cls"]) for r in rows}, key=lambda t: t)
    out = [
        "| dataset | scored on | class | k | subgroup P@k | subgroup AUROC | subgroup group P / R "
        "| confidence | penultimate P@k | probe P@k pooled / penultimate "
        "| Domino P@k penultimate / pooled | failure-directions P@k penultimate / pooled "
        "| loss P@k | loss AUROC | error mask P / R | svm P@k | svm group P / R |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---|---|---|---:|---:|---|---:|---|",
    ]
    for ds, split, cls in keys:
        sel = [r for r in rows if (r["dataset"], r["split"], r["cls"]) == (ds, split, cls)]

        def col(name: str, sel: list[dict[str, Any]] = sel) -> str:
            return _fmt([float(r[name]) for r in sel])

        out.append(
            f"| {ds} | {split} | {cls} | {int(np.mean([r['k'] for r in sel]))} "
            f"| {col('subgroup_pk')} | {col('subgroup_auroc')} "
            f"| {col('subgroup_group_p')} / {col('subgroup_group_r')} "
            f"| {col('subgroup_confidence')} | {col('penultimate_pk')} "
            f"| {col('probe_pooled_pk')} / {col('probe_penultimate_pk')} "
            f"| {col('domino_pk')} / {col('domino_pooled_pk')} "
            f"| {col('fd_pk')} / {col('fd_pooled_pk')} "
            f"| {col('loss_pk')} | {col('loss_auroc')} "
            f"| {col('errors_p')} / {col('errors_r')} | {col('svm_pk')} "
            f"| {col('svm_group_p')} / {col('svm_group_r')} |"
        )
    return out


def _seed_tag(seeds: range) -> str:
    """``3`` for seeds 0..2 (the historical file names), ``3-5`` otherwise."""
    return str(len(seeds)) if seeds.start == 0 else f"{seeds.start}-{seeds[-1]}"


def write_image_csv(splits: Splits, root: Path) -> Path:
    """``splits`` as PNGs + ``labels.csv`` (path,label,<group column>,split) under ``root``."""
    import csv

    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    column = splits.train.group_names[0].split("=")[0] if splits.train.group_names else "group"
    path = root / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", column, "split"])
        for split in ("train", "val", "test"):
            data: ImageSet = getattr(splits, split)
            (root / split).mkdir(exist_ok=True)
            arr = (data.x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
            for i in range(len(data)):
                name = f"{split}/{i:05d}.png"
                Image.fromarray(arr[i]).save(root / name)
                group = data.group_names[int(data.g[i])].split("=", 1)[-1]
                writer.writerow([name, data.class_names[int(data.y[i])], group, split])
    return path


@click.command("mining")
@click.option(
    "--dataset",
    type=click.Choice(["colored-fmnist", "sticker-fmnist", "texture-fmnist", "image-csv"]),
    default="colored-fmnist",
    show_default=True,
)
@click.option("--seeds", default=1, show_default=True, help="N seeds (data, model, miner)")
@click.option(
    "--first-seed", default=0, show_default=True, help="seeds FIRST..FIRST+N-1 (fresh seeds)"
)
@click.option("--n-train", type=int, default=None, help="training images (dataset default)")
@click.option("--epochs", default=4, show_default=True, help="ERM epochs of the base model")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="data.train.root")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None)
@click.option("--group-columns", default="", help="image-csv: comma-separated group columns")
@click.option("--class-names", default="", help="image-csv: comma-separated class names")
@click.option("--image-size", type=int, default=None)
@click.option(
    "--make-image-csv",
    type=click.Path(path_type=Path),
    default=None,
    help="write a sticker-fmnist (pullover vs coat) image-CSV folder here and exit",
)
@click.option(
    "--peer-python",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="Python of an environment with Domino 0.1.5 and failure-directions 0.1.3 "
    "(benchmarks/peers/setup-peers.sh): runs them beside the miners on the same embeddings",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"))
def mining(
    dataset: str,
    seeds: int,
    first_seed: int,
    n_train: int | None,
    epochs: int,
    root: Path | None,
    csv_path: Path | None,
    group_columns: str,
    class_names: str,
    image_size: int | None,
    make_image_csv: Path | None,
    peer_python: Path | None,
    out: Path,
) -> None:
    """Subgroup recovery per class: fit on val, scored on train and test, every baseline."""
    import torch

    torch.set_num_threads(int(os.environ.get("PATCHD_BENCH_THREADS", "1")))
    if make_image_csv is not None:
        from patchd.plugins.datasets.sticker_fmnist import make_sticker_fmnist

        path = write_image_csv(make_sticker_fmnist(pair="pullover-coat", seed=0), make_image_csv)
        click.echo(
            f"wrote {path}; run: patchd bench mining --dataset image-csv --root "
            f"{make_image_csv} --group-columns sticker --image-size 28"
        )
        return
    extra: dict[str, Any] = {}
    if root is not None:
        extra["root"] = root
    if csv_path is not None:
        extra["csv"] = csv_path
    if group_columns:
        extra["group_columns"] = [c.strip() for c in group_columns.split(",") if c.strip()]
    if class_names:
        extra["class_names"] = [c.strip() for c in class_names.split(",") if c.strip()]
    if image_size is not None:
        extra["image_size"] = image_size
    if dataset == "image-csv" and not extra.get("group_columns"):
        raise click.UsageError("--dataset image-csv needs --group-columns (they define the truth)")
    runs = []
    chosen = range(first_seed, first_seed + seeds)
    for seed in chosen:
        res = run_seed(dataset, seed, n_train, epochs, extra, peer_python)
        runs.append(res)
        click.echo(
            f"seed {seed}: ERM test worst-group {res['erm_test_worst_group']}, cells "
            f"{res['erm_test_cells']}; train {res['train_seconds']} s; mine s {res['mine_seconds']}"
        )
        click.echo(f"run report (scored on train):\n{res['report']['train']}")
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [r for res in runs for r in res["rows"]]
    click.echo(f"{date}, {MACHINE}, {dataset}, seeds {chosen[0]}..{chosen[-1]}, fit on val")
    for line in table(rows):
        click.echo(line)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mining-{dataset}-{datetime.now(UTC):%Y-%m-%d}-seeds{_seed_tag(chosen)}.json"
    body = {
        "date": date,
        "machine": MACHINE,
        "python": platform.python_version(),
        "dataset": dataset,
        "epochs": epochs,
        "runs": runs,
    }
    path.write_text(json.dumps(body, indent=2, default=float))
    click.echo(f"results: {path}")

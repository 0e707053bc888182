"""``patchd bench mining``: does the SVM failure direction recover the hidden minority colour?

colored-fmnist (tops vs the rest, background colour = class with p = 0.99 in train, 0.5 in
val/test). A small CNN is trained with plain ERM (it learns the colour shortcut); then the miner
runs with the colour HIDDEN (groups unknown) in three settings:

- ``val``: SVMs fit on val, hard side assigned on val (Jain et al.'s setup);
- ``val->test``: SVMs fit on val, hard side assigned on unseen test images (does the direction
  generalise beyond the errors it was fit on?);
- ``train``: SVMs fit on the training set alone (what the pipeline's mine stage sees: few errors).

Per class it reports the precision / recall of "hard side" for "minority colour", their adjusted
Rand index, and the SVM's 2-fold CV balanced accuracy. Baseline: the model's own error mask
("hard = predicted wrong") on the same examples.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import click

MACHINE = "2-core x86_64, no GPU"


@dataclass(frozen=True)
class Recovery:
    setting: str
    cls: int
    n: int
    n_minority: int
    n_hard: int
    precision: float
    recall: float
    ari: float
    svm_cv_balanced_accuracy: float
    baseline_error_precision: float
    baseline_error_recall: float
    baseline_error_ari: float


def _prf(minority, hard) -> tuple[float, float, float]:  # noqa: ANN001 - bool arrays
    from sklearn.metrics import adjusted_rand_score

    tp = int((minority & hard).sum())
    precision = tp / max(1, int(hard.sum()))
    recall = tp / max(1, int(minority.sum()))
    return precision, recall, float(adjusted_rand_score(minority, hard))


def _recoveries(setting: str, data, result, model) -> list[Recovery]:  # noqa: ANN001
    from patchd.ml.models import predict

    wrong = (predict(model, data.x).argmax(1) != data.y).numpy()
    out = []
    for cls in range(data.num_classes):
        rows = (data.y == cls).numpy()
        minority = (data.g.numpy() != cls)[rows]
        hard = (result.groups.numpy() == 1)[rows]
        p, r, a = _prf(minority, hard)
        bp, br, ba = _prf(minority, wrong[rows])
        strength = result.modes[cls].strength
        out.append(
            Recovery(
                setting,
                cls,
                int(rows.sum()),
                int(minority.sum()),
                int(hard.sum()),
                p,
                r,
                a,
                strength,
                bp,
                br,
                ba,
            )
        )
    return out


def run(n_train: int, epochs: int, seed: int, p_train: float = 0.99) -> dict[str, object]:
    import torch

    from patchd.abc import StageContext
    from patchd.config import DatasetSpec, PatchConfig
    from patchd.ml.datasets import load_splits
    from patchd.ml.evaluate import evaluate_model
    from patchd.ml.models import small_cnn
    from patchd.ml.training import fit, seed_everything
    from patchd.plugins.miners.svm import SVMDirectionMiner

    torch.set_num_threads(1)
    t0 = time.monotonic()
    spec = DatasetSpec(
        kind="colored-fmnist", n_train=n_train, seed=seed, options={"p_train": p_train}
    )
    s = load_splits(spec)
    seed_everything(seed)
    model = small_cnn()
    fit(model, s.train, epochs=epochs, batch_size=64, lr=1e-3, seed=seed)
    t_train = time.monotonic() - t0
    erm = evaluate_model(model, s.test, s.train)

    def hide(d):  # noqa: ANN001, ANN202
        return d.with_groups(torch.full_like(d.g, -1), ())

    rows, timings = [], {}
    settings = (("val", s.val, None), ("val->test", s.test, s.val), ("train", s.train, None))
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext("bench", "mine", Path(tmp), PatchConfig(), seed=seed)
        for name, data, fit_on in settings:
            t = time.monotonic()
            fit_data = hide(fit_on) if fit_on is not None else None
            result = SVMDirectionMiner().mine(ctx, model, hide(data), fit_data=fit_data)
            timings[name] = time.monotonic() - t
            rows += _recoveries(name, data, result, model)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": MACHINE,
        "python": platform.python_version(),
        "n_train": n_train,
        "p_train": p_train,
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(t_train, 1),
        "mine_seconds": {k: round(v, 1) for k, v in timings.items()},
        "erm_test_cells": {c.key: round(c.accuracy, 4) for c in erm.cells},
        "erm_test_worst_group": round(erm.worst_group_accuracy, 4),
        "erm_test_average": round(erm.average_pooled, 4),
        "recovery": [asdict(r) for r in rows],
    }


def _print(res: dict[str, object]) -> None:
    click.echo(
        f"ERM on colored-fmnist (n_train={res['n_train']}, p_train={res['p_train']}, "
        f"{res['epochs']} epochs, "
        f"{res['train_seconds']} s): test worst-group {res['erm_test_worst_group']}, "
        f"average {res['erm_test_average']}; cells {res['erm_test_cells']}"
    )
    click.echo(
        "| date | machine | setting | class | precision | recall | ARI | SVM CV bal. acc "
        "| errors-as-hard P / R / ARI | mine s |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|---|")
    for r in res["recovery"]:  # type: ignore[union-attr]
        click.echo(
            f"| {res['date']} | {res['machine']} | {r['setting']} | {r['cls']} "
            f"| {r['precision']:.3f} | {r['recall']:.3f} | {r['ari']:.3f} "
            f"| {r['svm_cv_balanced_accuracy']:.3f} | {r['baseline_error_precision']:.3f} / "
            f"{r['baseline_error_recall']:.3f} / {r['baseline_error_ari']:.3f} "
            f"| {res['mine_seconds'][r['setting']]} |"  # type: ignore[index]
        )


@click.command("mining")
@click.option("--n-train", default=20000, show_default=True, help="colored-fmnist training images")
@click.option("--epochs", default=4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--p-train", default=0.99, show_default=True, help="colour/label agreement in train")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"))
def mining(n_train: int, epochs: int, seed: int, p_train: float, out: Path) -> None:
    """Mining quality on colored-fmnist with the colour hidden from the miner."""
    res = run(n_train, epochs, seed, p_train)
    _print(res)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"mining-{res['date']}-p{p_train}-seed{seed}.json"
    path.write_text(json.dumps(res, indent=2))
    click.echo(f"results: {path}")

"""A user's own data and model, made in the test: an image folder + CSV, a trained classifier.

The pixels come from scikit-learn's bundled digits (colored-digits: digit < 5 vs >= 5, the
background colour correlated with the class in train), written as PNG files with a
``path,label,color,split`` table, so everything patchd reads goes through the ``image-csv``
loader as a user's folder would. The model is the built-in small CNN trained briefly with ERM
on that folder (it learns the colour shortcut) and saved as safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CLASS_NAMES = ("0-4", "5-9")
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 16


def write_image(path: Path, chw: Any) -> None:
    import numpy as np
    from PIL import Image

    arr = (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_dataset(
    root: Path, per_split: int | None = None, seed: int = 0, p_train: float = 0.9
) -> Path:
    """``root/images/<split>/<i>.png`` plus ``root/labels.csv``; returns the CSV's path.

    ``p_train``: how often the background colour matches the class in the train split (0.5 in
    val and test), so each class has a minority colour of about ``(1 - p_train)`` of its rows.
    """
    from patchd.config import DatasetSpec
    from patchd.ml.datasets import load_splits

    spec = DatasetSpec(kind="colored-digits", seed=seed, options={"p_train": p_train})
    splits = load_splits(spec)
    lines = ["path,label,color,split"]
    for split in SPLITS:
        data = getattr(splits, split)
        for i in range(min(len(data), per_split or len(data))):
            rel = f"images/{split}/{i}.png"
            write_image(root / rel, data.x[i])
            color = data.group_names[int(data.g[i])].split("=")[1]
            lines.append(f"{rel},{CLASS_NAMES[int(data.y[i])]},{color},{split}")
    csv = root / "labels.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def train_model(root: Path, weights: Path, epochs: int = 3, width: int = 8) -> str:
    """The small CNN trained with ERM on the folder; safetensors at ``weights``; its sha256."""
    import torch

    from patchd.config import DatasetSpec, ModelConfig
    from patchd.ml.datasets import load_splits
    from patchd.ml.models import build_model, save_weights
    from patchd.ml.training import fit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = DatasetSpec(kind="image-csv", root=root, group_columns=["color"], image_size=IMAGE_SIZE)
    model = build_model(
        ModelConfig(factory_kwargs={"num_classes": 2, "width": width}, class_names=["a", "b"])
    )
    fit(model, load_splits(spec).train, epochs=epochs, seed=0)
    return save_weights(model, weights)


def production_events(images: Path, n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` production images (another draw of the digits, half of them in the minority
    colour of their class) with their prediction events and late labels."""
    from patchd.config import DatasetSpec
    from patchd.ml.datasets import load_splits

    test = load_splits(DatasetSpec(kind="colored-digits", seed=1)).test
    preds, labels = [], []
    for i in range(min(n, len(test))):
        path = images / f"prod-{i}.png"
        write_image(path, test.x[i])
        color = test.group_names[int(test.g[i])].split("=")[1]
        preds.append(
            {
                "id": f"p{i}",
                "model": "digits",
                "pred": 0,
                "probs": [0.6, 0.4],
                "groups": {"color": color},
                "input": {"uri": path.as_uri()},
            }
        )
        labels.append({"id": f"p{i}", "model": "digits", "label": int(test.y[i])})
    return preds, labels


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path

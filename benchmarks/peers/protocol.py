"""What the peer scripts share: the IN.npz ``patchd bench mining`` writes and the OUT.json it
reads back (see ``domino_slices.py``). They run in the peers' own environment, where patchd is
not installed, so P@k is defined here as in :func:`patchd.bench.mining.precision_at_k`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np


def precision_at_k(score: np.ndarray, truth: np.ndarray) -> float:
    """Share of ``truth`` among the ``truth.sum()`` highest scores (NaN when it is empty)."""
    k = int(truth.sum())
    top = np.argsort(-score, kind="stable")[:k]
    return float(truth[top].mean()) if k else float("nan")


def embedding_names(f: Any) -> list[str]:
    """The embeddings IN.npz carries (``val_emb_<name>``)."""
    return sorted(k.removeprefix("val_emb_") for k in f.files if k.startswith("val_emb_"))


def class_cells(f: Any, split: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Per class of ``cells``: (class, its rows of ``split``, which of them are its minority)."""
    y, g = f[f"{split}_y"], f[f"{split}_g"]
    for c, cell in f["cells"]:
        rows = y == c
        yield int(c), rows, g[rows] == cell


def write(
    dst: str, tool: str, versions: dict[str, str], rows: list[dict[str, Any]], **extra: Any
) -> None:
    """OUT.json: one row per (embedding, split, class) with its ``pk``."""
    with open(dst, "w") as fh:
        json.dump({"tool": tool, "versions": versions, **extra, "rows": rows}, fh)

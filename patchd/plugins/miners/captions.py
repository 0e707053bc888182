"""CLIP captions for failure directions (Jain et al. §1.7 of research/failure_mining.md).

Candidates "a photo of a {adjective} {class} {context}" are scored by the class's SVM on the
difference of their text embedding and the reference "a photo of a {class}", passed through the
same standardise-then-L2 preprocessing as the images (image statistics, as the authors do). The
captions furthest on the failure side describe the hard examples; the furthest on the other side
the easy ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from patchd.plugins.miners.clip_embedder import ClipEmbedder
    from patchd.plugins.miners.directions import ClassDirection, Preprocessor

ADJECTIVES = ("", "red", "green", "blue", "white", "black", "yellow", "dark", "bright", "blurry")
CONTEXTS = (
    "",
    "on a red background",
    "on a green background",
    "on a blue background",
    "on a white background",
    "on a black background",
    "outside",
    "inside",
    "at night",
)
TOP_K = 5


def candidates(class_name: str) -> list[str]:
    out = []
    for adj, ctx in product(ADJECTIVES, CONTEXTS):
        words = ["a photo of a", adj, class_name, ctx]
        out.append(" ".join(w for w in words if w))
    return out


def caption_classes(
    clip: ClipEmbedder,
    pre: Preprocessor,
    dirs: Sequence[ClassDirection],
    class_names: Sequence[str],
) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per class: (hardest captions, easiest captions); empty when the direction is undefined."""
    out: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for d in dirs:
        if not d.defined:
            out.append(((), ()))
            continue
        texts = candidates(class_names[d.cls])
        emb = clip.embed_texts([f"a photo of a {class_names[d.cls]}", *texts]).numpy()
        diffs = pre(emb[1:] - emb[0])
        hardness = d.hardness(diffs)
        order = np.argsort(-hardness, kind="stable")
        hard = tuple(texts[i] for i in order[:TOP_K])
        easy = tuple(texts[i] for i in order[::-1][:TOP_K])
        out.append((hard, easy))
    return out

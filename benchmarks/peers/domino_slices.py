"""Domino 0.1.5 (``domino.DominoSlicer``) beside ``patchd bench mining``: a bench-only peer.

Run by the bench with the peer environment's Python (``setup-peers.sh`` builds it; Domino
pins libraries patchd cannot share: scikit-learn 0.24, meerkat-ml 0.2, pandas 1.5):

    <peer python> domino_slices.py IN.npz OUT.json

IN.npz (written by the bench): ``cells`` ([class, minority group] rows) and, per split in
val / train / test, ``<split>_y``, ``<split>_g``, ``<split>_probs`` and one array per embedding
``<split>_emb_<name>``. Per embedding, the slicer is fitted on val (embeddings, class targets,
the model's probabilities) with its defaults except ``n_pca_components``, capped at the
embedding's width (its default, 128, raises on narrower embeddings), and ``random_state``;
train and test are scored with ``predict_proba``. Per class, the slice whose probability ranks
the class's minority cell best is reported (picked with the truth: optimistic for the peer).

Compatibility: scikit-learn >= 1.0 dropped the private ``sklearn.mixture._base._check_X`` that
Domino imports; it is restored below with the old semantics (validate a float array, check the
sample count against the components and the width against the fitted width). Nothing else of
Domino's is touched.
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import numpy as np
from protocol import class_cells, embedding_names, precision_at_k, write

os.environ.setdefault("TQDM_DISABLE", "1")


def _restore_check_x() -> None:
    import sklearn.mixture._base as base
    from sklearn.utils import check_array

    def _check_X(X, n_components=None, n_features=None, ensure_min_samples=1):  # noqa: N802,N803
        X = check_array(X, dtype=[np.float64, np.float32], ensure_min_samples=ensure_min_samples)
        if n_components is not None and X.shape[0] < n_components:
            raise ValueError(f"{X.shape[0]} samples for {n_components} components")
        if n_features is not None and X.shape[1] != n_features:
            raise ValueError(f"expected {n_features} features, got {X.shape[1]}")
        return X

    if not hasattr(base, "_check_X"):
        base._check_X = _check_X


def main(src: str, dst: str) -> None:
    _restore_check_x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import domino
        from domino import DominoSlicer

    f = np.load(src)
    rows = []
    for name in embedding_names(f):
        x = f[f"val_emb_{name}"]
        slicer = DominoSlicer(n_pca_components=min(128, x.shape[1]), random_state=0)
        t = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slicer.fit(embeddings=x, targets=f["val_y"], pred_probs=f["val_probs"])
        fit_s = time.monotonic() - t
        for split in ("train", "test"):
            slices = slicer.predict_proba(
                embeddings=f[f"{split}_emb_{name}"],
                targets=f[f"{split}_y"],
                pred_probs=f[f"{split}_probs"],
            )
            for c, r, truth in class_cells(f, split):
                pks = [precision_at_k(slices[r, s], truth) for s in range(slices.shape[1])]
                best = int(np.nanargmax(pks))
                rows.append(
                    {"embedding": name, "split": split, "cls": c, "pk": pks[best],
                     "slice": best, "n_slices": len(pks), "fit_s": round(fit_s, 2)}
                )  # fmt: skip
    import sklearn

    versions = {"domino": getattr(domino, "__version__", "0.1.5"), "sklearn": sklearn.__version__}
    write(dst, "domino.DominoSlicer", versions, rows)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

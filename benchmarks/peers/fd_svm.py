"""failure-directions 0.1.3 (``failure_directions.SVMFitter``) beside ``patchd bench mining``.

A bench-only peer, run with the peer environment's Python (the Domino venv plus
``pip install --no-deps failure-directions==0.1.3`` and the cheap imports it pulls in:
tensorboard, timm, torchmetrics, nltk, clip-anytorch, setuptools<81 for clip's pkg_resources):

    <peer python> fd_svm.py IN.npz OUT.json

IN.npz is the one ``domino_slices.py`` reads (``cells``; per split ``<split>_y``, ``<split>_g``,
``<split>_probs``, ``<split>_emb_<name>``). Per embedding, as the package's README does:
``set_preprocess`` on the train embeddings (whitening statistics, no labels), ``fit`` on val
(embeddings, labels, the model's argmax predictions) with the defaults (per class, a linear SVC
predicting "model correct", class-balanced, C picked from 1e-6..1 by 2-fold balanced-accuracy
CV), then ``predict`` on train and test. The score is minus the decision value (the "incorrect"
side); per class, P@k ranks the class's minority cell, k its size. Embedding columns that are
constant on train (dead units) are dropped first: whitening divides by their zero std, and the
NaNs stop the SVC. CPU only.

Compatibility placeholders, inert modules put in ``sys.modules`` before the import; their names
resolve to no-op classes, and the SVM path (``SVMPreProcessing``, ``train_per_class_svm``,
``predict_per_class_svm``) takes arrays and calls none of them:

- ``ffcv`` and the submodules that are imported (does not build: it needs OpenCV). It is used
  only by ``src/ffcv_utils.py`` and ``src/decoders_and_transforms.py`` (FFCV loaders,
  decoders, augmentations), imported at module level by ``wrappers``, ``svm_utils`` and
  ``trainer``; at import it only instantiates a decoder as a default argument.
- ``failure_directions.src.clip_utils``: imported only by the package ``__init__`` (for
  ``get_caption_set``, caption sets); at import it reads the NLTK WordNet corpus, which
  comes from nltk.org, not PyPI.
"""

from __future__ import annotations

import os
import sys
import time
import types
import warnings
from importlib.metadata import version

import numpy as np
from protocol import class_cells, embedding_names, precision_at_k, write

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

PLACEHOLDERS = [
    "ffcv", "ffcv.fields", "ffcv.fields.decoders", "ffcv.loader", "ffcv.pipeline",
    "ffcv.pipeline.operation", "ffcv.pipeline.allocation_query", "ffcv.pipeline.state",
    "ffcv.transforms", "ffcv.transforms.common", "failure_directions.src.clip_utils",
]  # fmt: skip


def _install_placeholders() -> None:
    def off(attr: str) -> type:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return type(attr, (), {"__init__": lambda self, *a, **k: None})

    for name in PLACEHOLDERS:
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__getattr__ = off  # type: ignore[method-assign]
        sys.modules[name] = mod
        parent, _, leaf = name.rpartition(".")
        if parent.startswith("ffcv"):
            setattr(sys.modules[parent], leaf, mod)


def main(src: str, dst: str) -> None:
    _install_placeholders()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from failure_directions.src.wrappers import SVMFitter

    f = np.load(src)
    rows = []
    for name in embedding_names(f):
        live = np.ptp(f[f"train_emb_{name}"], axis=0) > 0
        emb = {s: f[f"{s}_emb_{name}"][:, live] for s in ("train", "val", "test")}
        fitter = SVMFitter()
        t = time.monotonic()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitter.set_preprocess(emb["train"])
            fitter.fit(preds=f["val_probs"].argmax(1), ys=f["val_y"], latents=emb["val"])
        fit_s = time.monotonic() - t
        for split in ("train", "test"):
            ys = f[f"{split}_y"]
            _, decision = fitter.predict(ys=ys, latents=emb[split], compute_metrics=False)
            for c, r, truth in class_cells(f, split):
                rows.append(
                    {"embedding": name, "split": split, "cls": c,
                     "pk": precision_at_k(-decision[r], truth),
                     "dims": int(live.sum()), "fit_s": round(fit_s, 2)}
                )  # fmt: skip
    versions = {p: version(p) for p in ("failure-directions", "scikit-learn", "torch")}
    write(dst, "failure_directions.SVMFitter", versions, rows, placeholders=PLACEHOLDERS)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

#!/usr/bin/env bash
# The peer environment for `patchd bench mining --peer-python`: Domino 0.1.5, failure-directions
# 0.1.3 and the old libraries they need, in a venv of its own (never patchd's: Domino pins
# pandas 1.5 and meerkat-ml 0.2).
# Usage: benchmarks/peers/setup-peers.sh [VENV]   (default /tmp/peers-venv); ~10 min, ~3 GB.
set -euo pipefail
VENV=${1:-/tmp/peers-venv}
python3 -m venv "$VENV"
P="$VENV/bin/pip"
# scikit-learn 1.1.3: the oldest release with Python 3.11 wheels (0.24.2, Domino's pin, does not
# build); it lacks only sklearn.mixture._base._check_X, which domino_slices.py restores.
"$P" install -q "numpy<2" scikit-learn==1.1.3 scipy==1.11.4 tqdm torch==2.14.1 nvidia-nvjitlink==13.4.92
"$P" install -q --no-deps domino==0.1.5 meerkat-ml==0.2.4
# what the imports of domino and meerkat need, without their pins (pandas 1.5: meerkat 0.2 uses
# pandas.core.strings.StringMethods; pyarrow 17: newer needs numpy 2; datasets 2.14).
"$P" install -q --no-deps PyYAML dill pyarrow==17.0.0 IPython traitlets pygments pillow cytoolz \
  toolz datasets==2.14.7 multiprocess huggingface_hub==0.20.3 packaging idna requests urllib3 \
  certifi aiohttp multidict attrs yarl propcache aiohappyeyeballs aiosignal frozenlist \
  pyarrow_hotfix xxhash pandas==1.5.3 fvcore tabulate torchvision==0.29.1 ipywidgets comm \
  matplotlib pyparsing cycler kiwisolver fontTools seaborn
"$VENV/bin/python" -c "import domino; from domino import DominoSlicer; print('domino ok')"
# failure-directions 0.1.3 (the SVMFitter), without its pins; ffcv does not build (it needs
# OpenCV) and fd_svm.py stands in inert modules for it, off the SVM path (see its docstring).
"$P" install -q --no-deps failure-directions==0.1.3
"$P" install -q tensorboard timm torchmetrics nltk clip-anytorch "setuptools<81" \
  torch==2.14.1 torchvision==0.29.1 "numpy<2" scikit-learn==1.1.3 scipy==1.11.4 pandas==1.5.3

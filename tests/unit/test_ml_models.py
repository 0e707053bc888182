"""Models: factory, safetensors roundtrip and mismatch errors, features hook, training."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from patchd.config import DatasetSpec, ModelConfig
from patchd.exceptions import PluginError, StageError
from patchd.ml.datasets import load_splits
from patchd.ml.evaluate import evaluate_model
from patchd.ml.models import (
    build_model,
    features,
    last_linear,
    load_weights,
    pick_device,
    pooled_features,
    predict,
    resnet18,
    save_weights,
    sha256_file,
    small_cnn,
)
from patchd.ml.training import fit, seed_everything

torch.set_num_threads(1)


def test_build_model_builtin_and_kwargs() -> None:
    model = build_model(
        ModelConfig(
            factory="patchd.ml.models:small_cnn", factory_kwargs={"num_classes": 3, "width": 4}
        )
    )
    assert last_linear(model).out_features == 3
    for size in (8, 16, 33):  # adaptive pooling: any image size
        assert model(torch.rand(2, 3, size, size)).shape == (2, 3)


def test_resnet18_builds_without_download() -> None:
    model = resnet18(num_classes=2)
    assert last_linear(model) is model.fc
    assert features(model, torch.rand(2, 3, 32, 32)).shape == (2, 512)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        ("no_such_pkg.models:net", "cannot import module 'no_such_pkg.models'"),
        ("patchd.ml.models:nope", "has no attribute 'nope'"),
        ("patchd.ml.models:DEFAULT_BATCH", "not a callable"),
        ("patchd.ml.models:sha256_file", "rejected its kwargs"),
    ],
)
def test_bad_factory_names_the_path(factory: str, match: str) -> None:
    with pytest.raises(PluginError, match=match) as err:
        build_model(ModelConfig(factory=factory))
    assert factory.split(":")[0] in str(err.value)


def test_factory_returning_non_module() -> None:
    with pytest.raises(PluginError, match="not a torch nn.Module"):
        build_model(ModelConfig(factory="patchd.ml.models:pick_device"))


def test_save_load_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a, b = small_cnn(width=4), small_cnn(width=4)
    path = tmp_path / "sub" / "model.safetensors"
    digest = save_weights(a, path)
    assert digest == sha256_file(path) and len(digest) == 64
    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]  # no temp left
    x = torch.rand(3, 3, 16, 16)
    assert not torch.allclose(predict(a, x), predict(b, x))
    load_weights(b, path)
    assert torch.allclose(predict(a, x), predict(b, x))
    assert save_weights(b, tmp_path / "again.safetensors") == digest  # deterministic bytes


def test_load_mismatched_weights_lists_the_problems(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(small_cnn(num_classes=3, width=4), path)
    with pytest.raises(StageError, match=r"shape mismatch \[head.weight: file \(3, 16\)"):
        load_weights(small_cnn(num_classes=2, width=4), path)
    with pytest.raises(StageError, match="missing keys .*unexpected keys"):
        load_weights(resnet18(), path)


def test_load_refuses_non_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(StageError, match="not a readable safetensors file"):
        load_weights(small_cnn(), bad)
    with pytest.raises(StageError, match="does not exist"):
        load_weights(small_cnn(), tmp_path / "missing.safetensors")


def test_load_strips_dataparallel_prefix(tmp_path: Path) -> None:
    wrapped = nn.Sequential()
    wrapped.add_module("module", small_cnn(width=4))
    save_weights(wrapped, tmp_path / "dp.safetensors")
    load_weights(small_cnn(width=4), tmp_path / "dp.safetensors")


def test_features_is_the_input_of_the_last_linear() -> None:
    torch.manual_seed(0)
    model = small_cnn(width=4)
    x = torch.rand(5, 3, 16, 16)
    feats = features(model, x, batch_size=2)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(feats, model.body(x), atol=1e-6)
        assert torch.allclose(model.head(feats), model(x), atol=1e-5)
    assert not model.head._forward_pre_hooks  # hook removed
    with pytest.raises(StageError, match="no nn.Linear"):
        features(nn.Conv2d(3, 2, 1), x)


def test_pooled_features_are_the_last_spatial_activation_pooled_over_positions() -> None:
    torch.manual_seed(0)
    model = small_cnn(width=4).train()
    x = torch.rand(5, 3, 16, 16)
    pooled = pooled_features(model, x, batch_size=2)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        last = model.body[:6](x)  # the AdaptiveAvgPool2d(4) output: [5, 8, 4, 4]
    assert pooled is not None and pooled.shape == (5, 16)
    assert torch.allclose(pooled, torch.cat([last.amax((2, 3)), last.mean((2, 3))], 1), atol=1e-6)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    # a patch anywhere: the same channels' max (what a position-free subgroup needs)
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(128, 2))
    a, b = torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8)
    a[:, :, 1:3, 1:3], b[:, :, 5:7, 4:6] = 1.0, 1.0
    pa, pb = pooled_features(conv, a), pooled_features(conv, b)
    assert pa is not None and pb is not None
    assert torch.allclose(pa, pb, atol=1e-6)
    assert pooled_features(nn.Sequential(nn.Flatten(), nn.Linear(48, 2)), x[:, :, :4, :4]) is None


def test_predict_probs_and_training_mode_restored() -> None:
    model = small_cnn(width=4)
    model.train()
    probs = predict(model, torch.rand(4, 3, 16, 16))
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(1), torch.ones(4))
    assert model.training
    assert predict(model, torch.zeros(0, 3, 16, 16)).shape == (0, 2)
    assert pick_device().type in ("cpu", "cuda")


def test_fit_learns_colored_digits_shortcut() -> None:
    s = load_splits(DatasetSpec(kind="colored-digits"))
    seed_everything(0)
    result = fit(small_cnn(width=8), s.train, epochs=3, batch_size=64, lr=3e-3)
    assert result.history[-1]["acc"] > 0.95 and result.epochs == 3
    ev = evaluate_model(result.model, s.test, s.train)
    # the colour shortcut: majority cells right, minority cells wrong
    assert ev.average_pooled > 0.4 and ev.worst_group_accuracy < 0.3
    assert ev.average_reweighted > 0.9


def test_fit_with_sample_weights_and_bad_input() -> None:
    s = load_splits(DatasetSpec(kind="colored-digits", n_train=64))
    w = torch.ones(len(s.train))
    fit(small_cnn(width=4), s.train, epochs=1, sample_weights=w)
    with pytest.raises(StageError, match="sample_weights has shape"):
        fit(small_cnn(width=4), s.train, epochs=1, sample_weights=torch.ones(3))
    with pytest.raises(StageError, match="empty dataset"):
        fit(small_cnn(width=4), s.train.subset(torch.zeros(0, dtype=torch.long)), epochs=1)

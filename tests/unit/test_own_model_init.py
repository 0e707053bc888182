"""A user's own model and data: input normalization, and ``patchd init`` on a generated folder.

Real parts throughout: PNG files and a CSV on disk read by the image-csv loader, models built from
their factory with safetensors weights, the ``patchd`` command's own entry point.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from patchd.cli import main
from patchd.config import ModelConfig, build_config, load_config
from patchd.exceptions import ConfigError, StageError
from patchd.ml.models import build_model, load_weights, save_weights
from tests.own_data_support import make_dataset

torch.set_num_threads(1)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]


def _cnn(**norm: list[float]) -> torch.nn.Module:
    config = ModelConfig(
        factory_kwargs={"num_classes": 2, "width": 4},
        input_normalization=norm or None,
    )
    torch.manual_seed(0)
    return build_model(config)


def test_input_normalization_is_applied_before_forward_and_keeps_the_state_dict(
    tmp_path: Path,
) -> None:
    plain, normed = _cnn(), _cnn(mean=MEAN, std=STD)
    assert plain.state_dict().keys() == normed.state_dict().keys()
    normed.load_state_dict(plain.state_dict())
    x = torch.rand(5, 3, 16, 16)
    by_hand = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(normed(x), plain(by_hand), atol=1e-6)
        assert not torch.allclose(normed(x), plain(x), atol=1e-3)
        # trainers deep-copy the model; the copy normalizes too
        assert torch.allclose(copy.deepcopy(normed)(x), plain(by_hand), atol=1e-6)
    # weights written from the normalized model load into a plain one and vice versa
    path = tmp_path / "w.safetensors"
    save_weights(normed, path)
    again = load_weights(_cnn(mean=MEAN, std=STD), path)
    with torch.no_grad():
        assert torch.allclose(again(x), normed(x))


def test_input_normalization_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="mean has 3 values and std 2"):
        build_config({"model": {"input_normalization": {"mean": MEAN, "std": [1.0, 1.0]}}})
    with pytest.raises(ConfigError, match="std values must be > 0"):
        build_config({"model": {"input_normalization": {"mean": [0.5], "std": [0.0]}}})
    two = _cnn(mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(StageError, match="input_normalization has 2 channel values"):
        two(torch.rand(2, 3, 16, 16))


# --- patchd init ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("own") / "data"
    make_dataset(root, per_split=40)
    return root


def _weights(path: Path, **kwargs: int) -> Path:
    torch.manual_seed(0)
    save_weights(build_model(ModelConfig(factory_kwargs=kwargs)), path)
    return path


def _init(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        main(["init", *args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _args(folder: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--csv",
        str(folder / "labels.csv"),
        "--weights",
        str(weights),
        "--factory-kwargs",
        '{"num_classes": 2, "width": 4}',
        "--image-size",
        "16",
        "--name",
        "digits",
        "-o",
        str(out),
        *extra,
    ]


def test_init_writes_a_valid_commented_config(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _weights(tmp_path / "model.safetensors", num_classes=2, width=4)
    out = tmp_path / "patchd.yaml"
    code, stdout, err = _init(capsys, *_args(folder, weights, out))
    assert code == 0, err
    assert "train 40, val 40, test 40 rows" in stdout and "group columns: color" in stdout
    assert "input [32, 3, 16, 16] -> output [32, 2]" in stdout
    text = out.read_text()
    assert "# patchd feeds RGB floats in [0, 1]" in text  # commented, not bare
    config = load_config(out, {})
    assert config.model.name == "digits" and config.model.weights == weights.resolve()
    assert config.model.class_names == ["0-4", "5-9"]
    assert config.model.factory_kwargs == {"num_classes": 2, "width": 4}
    assert config.data.train.kind == "image-csv" and config.data.train.group_columns == ["color"]
    assert config.data.train.root == folder.resolve() and config.data.train.image_size == 16
    assert config.groups.attributes == ["color"]
    assert (config.patch.miner, config.patch.augmenter, config.patch.trainer) == (
        "subgroup",
        "none",
        "gdro",
    )
    assert config.sources.allowed_roots == [folder.resolve()]
    # an existing file is kept
    code, _, err = _init(capsys, *_args(folder, weights, out))
    assert code == 1 and "exists; pass --force" in err


def test_init_without_groups_and_with_the_camel_recipe(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = _weights(tmp_path / "model.safetensors", num_classes=2, width=4)
    out = tmp_path / "patchd.yaml"
    code, stdout, err = _init(capsys, *_args(folder, weights, out, "--group-columns", ""))
    assert code == 0, err
    assert "no group columns: subgroups will be mined" in stdout
    mined = yaml.safe_load(out.read_text())
    assert mined["data"]["train"]["group_columns"] == [] and mined["patch"]["trainer"] == "gdro"
    code, _, err = _init(capsys, *_args(folder, weights, out, "--recipe", "camel", "--force"))
    assert code == 0, err
    camel = yaml.safe_load(out.read_text())["patch"]
    assert (camel["augmenter"], camel["trainer"]) == ("maskpaste", "camel")
    assert camel["budget"]["epochs"] == 15 and mined["patch"]["budget"]["epochs"] == 4


@pytest.mark.parametrize(
    ("kwargs", "extra", "message"),
    [
        ({"num_classes": 3, "width": 4}, ("--factory-kwargs", '{"num_classes": 3, "width": 4}'),
         "has 3 outputs but the data has 2 classes"),
        ({"num_classes": 2, "width": 4}, ("--factory-kwargs", '{"num_classes": 2}'),
         "do not match the architecture SmallCNN: shape mismatch"),
        ({"num_classes": 2, "width": 4}, ("--factory", "nope.module:build"),
         "cannot import module 'nope.module'"),
        ({"num_classes": 2, "width": 4}, ("--normalize-mean", "0.5,0.5", "--normalize-std", "1,1"),
         "input_normalization has 2 channel values"),
        ({"num_classes": 2, "width": 4}, ("--group-columns", "site"),
         "missing columns ['site']"),
        ({"num_classes": 2, "width": 4}, ("--class-names", "a,b"),
         "line 2: label '5-9' is not a known class ['a', 'b']"),
    ],
)  # fmt: skip
def test_init_refuses_with_a_clear_error(
    folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kwargs: dict[str, int],
    extra: tuple[str, ...],
    message: str,
) -> None:
    weights = _weights(tmp_path / "model.safetensors", **kwargs)
    out = tmp_path / "patchd.yaml"
    code, _, err = _init(capsys, *_args(folder, weights, out, *extra))
    assert code == 1 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_init_refuses_pickles_and_tables_without_a_test_split(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickle_file = tmp_path / "model.pt"
    pickle_file.write_bytes(b"\x80\x04not really")
    code, _, err = _init(capsys, *_args(folder, pickle_file, tmp_path / "a.yaml"))
    assert code == 1 and "is not a .safetensors file" in err
    table = folder / "labels.csv"
    no_test = tmp_path / "no_test.csv"
    no_test.write_text("".join(ln for ln in table.open() if not ln.rstrip().endswith(",test")))
    weights = _weights(tmp_path / "model.safetensors", num_classes=2, width=4)
    args = _args(folder, weights, tmp_path / "b.yaml", "--root", str(folder))
    args[1] = str(no_test)
    code, _, err = _init(capsys, *args)
    assert code == 1 and "has no rows with split=test" in err

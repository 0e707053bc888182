"""The plugin registry: built-in names, dotted paths, and a PluginError naming the plugin."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from patchd.abc import Trainer
from patchd.exceptions import PluginError
from patchd.plugins import catalog


@pytest.fixture
def fake_module() -> Iterator[types.ModuleType]:
    mod = types.ModuleType("patchd_test_fake_plugins")

    class NotATrainer:
        pass

    class Exploding(Trainer):
        def __init__(self) -> None:
            raise RuntimeError("needs a GPU")

        def train(self, *args: object) -> None:  # type: ignore[override]
            raise NotImplementedError

    mod.NotATrainer = NotATrainer  # type: ignore[attr-defined]
    mod.Exploding = Exploding  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def test_builtin_tables_name_every_contract_plugin() -> None:
    assert set(catalog.MINERS) == {"subgroup", "svm"}
    assert catalog.MINERS["subgroup"] == "patchd.plugins.miners.subgroup:SubgroupMiner"
    assert set(catalog.AUGMENTERS) == {"none", "maskpaste", "cyclegan", "diffusion", "vae"}
    assert set(catalog.TRAINERS) == {"erm", "gdro", "dfr", "jtt", "camel", "defuse"}
    assert catalog.TRAINERS["erm"] == "patchd.plugins.trainers.erm:ERMTrainer"
    assert catalog.MINERS["svm"] == "patchd.plugins.miners.svm:SVMDirectionMiner"


def test_builtin_erm_and_none_load() -> None:
    from patchd.plugins.trainers.erm import ERMTrainer

    assert isinstance(catalog.load_plugin("trainer", "erm"), ERMTrainer)
    none = catalog.load_plugin("augmenter", "none")
    assert none.synthesize(None, None, None).kind == "none"  # type: ignore[arg-type]
    dotted = catalog.load_plugin("trainer", "patchd.plugins.trainers.erm:ERMTrainer")
    assert isinstance(dotted, ERMTrainer)


@pytest.mark.parametrize(
    ("kind", "name", "match"),
    [
        ("trainer", "ermm", r"unknown trainer 'ermm'; built-in trainers are \['camel'"),
        ("widget", "x", r"unknown plugin kind 'widget'"),
        ("miner", "no_such_pkg.mod:Miner", r"miner 'no_such_pkg.mod:Miner': cannot import module"),
        ("trainer", "patchd.plugins.trainers.erm:Nope", r"has no 'Nope'"),
        (
            "trainer",
            "patchd_test_fake_plugins:NotATrainer",
            r"not a subclass of patchd.abc.Trainer",
        ),
        ("trainer", "patchd_test_fake_plugins:Exploding", r"constructing Exploding failed .*GPU"),
        ("trainer", "patchd.plugins.trainers.erm:", r"expected 'module:Class'"),
    ],
)
def test_errors_name_the_plugin(
    fake_module: types.ModuleType, kind: str, name: str, match: str
) -> None:
    with pytest.raises(PluginError, match=match):
        catalog.load_plugin(kind, name)


def test_resolve_does_not_import() -> None:
    before = set(sys.modules)
    assert catalog.resolve("augmenter", "diffusion").endswith(":DiffusionAugmenter")
    assert "patchd.plugins.augmenters.diffusion" not in set(sys.modules) - before

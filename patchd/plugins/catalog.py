"""The one table of built-in plugins, and loading a plugin by name or ``module:Class`` path.

Built-ins are listed here by name (``MINERS``, ``AUGMENTERS``, ``TRAINERS``) as ``module:Class``
strings so that nothing heavy is imported until a worker asks for the plugin. A config value that
contains ``:`` is taken as a third-party ``module:Class`` path instead of a built-in name.
"""

from __future__ import annotations

import importlib
from typing import Any

from patchd.exceptions import PluginError

MINERS: dict[str, str] = {
    "subgroup": "patchd.plugins.miners.subgroup:SubgroupMiner",
    "svm": "patchd.plugins.miners.svm:SVMDirectionMiner",
}

AUGMENTERS: dict[str, str] = {
    "none": "patchd.plugins.augmenters.none:NoneAugmenter",
    "cyclegan": "patchd.plugins.augmenters.cyclegan:CycleGANAugmenter",
    "maskpaste": "patchd.plugins.augmenters.maskpaste:MaskPasteAugmenter",
    "diffusion": "patchd.plugins.augmenters.diffusion:DiffusionAugmenter",
    "vae": "patchd.plugins.augmenters.vae:VAEAugmenter",
}

TRAINERS: dict[str, str] = {
    "erm": "patchd.plugins.trainers.erm:ERMTrainer",
    "gdro": "patchd.plugins.trainers.gdro:GroupDROTrainer",
    "dfr": "patchd.plugins.trainers.dfr:DFRTrainer",
    "camel": "patchd.plugins.trainers.camel:CamelTrainer",
    "jtt": "patchd.plugins.trainers.jtt:JTTTrainer",
    "defuse": "patchd.plugins.trainers.defuse:DefuseTrainer",
}

TABLES: dict[str, dict[str, str]] = {
    "miner": MINERS,
    "augmenter": AUGMENTERS,
    "trainer": TRAINERS,
}

BASES: dict[str, str] = {
    "miner": "Miner",
    "augmenter": "Augmenter",
    "trainer": "Trainer",
}


def resolve(kind: str, name_or_path: str) -> str:
    """The ``module:Class`` path for a built-in name or a dotted path (validated, not imported)."""
    table = TABLES.get(kind)
    if table is None:
        raise PluginError(f"unknown plugin kind {kind!r}; expected one of {sorted(TABLES)}")
    if ":" in name_or_path:
        return name_or_path
    target = table.get(name_or_path)
    if target is None:
        raise PluginError(
            f"unknown {kind} {name_or_path!r}; built-in {kind}s are {sorted(table)}, "
            "or give a third-party plugin as 'module:Class'"
        )
    return target


def load_class(kind: str, name_or_path: str) -> type[Any]:
    """Import the plugin class; every failure is a :class:`PluginError` naming the plugin."""
    target = resolve(kind, name_or_path)
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise PluginError(f"{kind} {name_or_path!r}: expected 'module:Class', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, SyntaxError, errors raised at import time
        raise PluginError(
            f"{kind} {name_or_path!r}: cannot import module {module_name!r} "
            f"({type(err).__name__}: {err})"
        ) from err
    cls = getattr(module, attr, None)
    if cls is None:
        raise PluginError(f"{kind} {name_or_path!r}: module {module_name!r} has no {attr!r}")
    _check_base(kind, name_or_path, cls)
    return cls


def _check_base(kind: str, name: str, cls: object) -> None:
    import patchd.abc as abc

    base = getattr(abc, BASES[kind])
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(
            f"{kind} {name!r}: {cls!r} is not a subclass of patchd.abc.{base.__name__}"
        )


def load_plugin(kind: str, name_or_path: str, **kwargs: Any) -> Any:
    """An instance of the named plugin (``kwargs`` go to its constructor)."""
    cls = load_class(kind, name_or_path)
    try:
        return cls(**kwargs)
    except PluginError:
        raise
    except Exception as err:
        raise PluginError(
            f"{kind} {name_or_path!r}: constructing {cls.__name__} failed "
            f"({type(err).__name__}: {err})"
        ) from err

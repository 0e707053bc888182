"""Options shared by every command that needs the configuration."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from patchd.config import Config, load_config
from patchd.exceptions import ConfigError

config_path_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="PATCHD_CONFIG",
    default=None,
    help="patchd.yaml (env PATCHD_CONFIG); PATCHD_* variables override its fields.",
)


@dataclass(frozen=True)
class GroupConfigPath:
    """The ``-c`` a command group was given, kept in ``ctx.obj`` for its subcommands, so that
    ``patchd runs -c FILE show RUN`` and ``patchd runs show RUN -c FILE`` mean the same."""

    path: Path | None


def store_group_config(ctx: click.Context, config_path: Path | None) -> None:
    """Called by a group that takes ``-c``: its subcommands fall back to this path."""
    ctx.obj = GroupConfigPath(config_path)


def resolved_config_path(config_path: Path | None) -> Path | None:
    """The subcommand's own ``-c`` when typed, else its group's, else ``PATCHD_CONFIG``."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or ctx.get_parameter_source("config_path") == ParameterSource.COMMANDLINE:
        return config_path
    group = ctx.find_object(GroupConfigPath)
    return group.path if group is not None and group.path is not None else config_path


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``-c/--config`` and passes a validated :class:`Config` as ``config``."""

    @config_path_option
    @functools.wraps(func)
    def wrapper(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        config = load_config(resolved_config_path(config_path), os.environ)
        return func(*args, config=config, **kwargs)

    return wrapper


def with_overrides(config: Config, **sections: dict[str, Any]) -> Config:
    """Apply CLI flag values (None means 'not given') on top of a loaded config."""
    from patchd.config import build_config

    data = config.model_dump(mode="json")
    for section, fields in sections.items():
        given = {k: v for k, v in fields.items() if v is not None}
        if given:
            data[section] = {**data.get(section, {}), **given}
    return build_config(data)


def model_view(config: Config, model: str | None) -> Config:
    """The one-model view of ``--model`` (the only model without it); a usage error naming the
    configured models when it is missing with several, or names none of them."""
    try:
        return config.for_model(model)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None


def model_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Adds ``--model NAME`` (env ``PATCHD_MODEL``) under :func:`config_option`: the command gets
    that model's one-model ``config`` (required when several models are configured)."""

    @click.option(
        "--model",
        "model_name",
        default=None,
        envvar="PATCHD_MODEL",
        metavar="NAME",
        help="The model (required when several are configured; env PATCHD_MODEL).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, config: Config, model_name: str | None, **kwargs: Any) -> Any:
        return func(*args, config=model_view(config, model_name), **kwargs)

    return wrapper

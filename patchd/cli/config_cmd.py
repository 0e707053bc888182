"""``patchd config check``: print the resolved configuration, or every error with its field path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import yaml

from patchd.cli.config_reload import reload as reload_command
from patchd.cli.options import config_path_option, resolved_config_path, store_group_config
from patchd.config import Config, load_config
from patchd.exceptions import ConfigError


@click.group()
@config_path_option
@click.pass_context
def config(ctx: click.Context, config_path: Path | None) -> None:
    """Inspect the configuration (-c works before or after the subcommand)."""
    store_group_config(ctx, config_path)


config.add_command(reload_command)


@config.command("check")
@config_path_option
def check(config_path: Path | None) -> None:
    """Validate the file + PATCHD_* environment; print the result as YAML (exit 1 on errors)."""
    try:
        resolved = load_config(resolved_config_path(config_path), os.environ)
        problems = semantic_errors(resolved)
    except ConfigError as err:
        click.secho(str(err), fg="red", err=True)
        sys.exit(1)
    if problems:
        click.secho("invalid configuration:\n" + "\n".join(problems), fg="red", err=True)
        sys.exit(1)
    click.echo(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), nl=False)


def semantic_errors(config: Config) -> list[str]:
    """Checks that need more than one field: tail globs inside allowed roots, token file."""
    from patchd.ingest.tailer import check_glob

    errors = []
    for i, source in enumerate(config.sources.tail):
        try:
            check_glob(source.glob, config.sources.allowed_roots)
        except ConfigError as err:
            errors.append(f"sources.tail.{i}.glob: {err}")
    token_file = config.api.token_file
    if token_file is not None:
        from patchd.api.auth import read_token_file

        try:
            read_token_file(token_file)
        except ConfigError as err:
            errors.append(str(err))
    return errors

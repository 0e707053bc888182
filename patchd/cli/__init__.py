"""The ``patchd`` command: a thin click shell over the library.

Subcommands are loaded lazily from :data:`COMMANDS` so that ``patchd status`` never imports what
``patchd worker`` needs (torch). Each entry is ``name -> "module:attribute"``; the module lives in
``patchd/cli/`` and owns its commands.
"""

from __future__ import annotations

import importlib
import sys

import click

from patchd.exceptions import PatchdError

COMMANDS: dict[str, str] = {
    "serve": "patchd.cli.serve:serve",
    "ingest": "patchd.cli.serve:ingest",
    "config": "patchd.cli.config_cmd:config",
    "init": "patchd.cli.init_cmd:init",
    "status": "patchd.cli.monitor:status",
    "worker": "patchd.cli.runs:worker",
    "runs": "patchd.cli.runs:runs",
    "patch": "patchd.cli.runs:patch",
    "candidates": "patchd.cli.candidates:candidates",
    "approve": "patchd.cli.candidates:approve",
    "reject": "patchd.cli.candidates:reject",
    "rollback": "patchd.cli.candidates:rollback",
    "report": "patchd.cli.candidates:report",
    "registry": "patchd.cli.candidates:registry",
    "regions": "patchd.cli.regions:regions",
    "bench": "patchd.cli.bench:bench",
    "demo": "patchd.cli.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="patchd")
def cli() -> None:
    """patchd: watch a deployed image classifier per subgroup and patch it when a subgroup fails."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures exit 1 with one clear line, no traceback."""
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except PatchdError as err:
        click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)

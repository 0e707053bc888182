"""``patchd config reload``: make the running serve re-read its configuration file (as SIGHUP).

What serve takes while running (the monitor's thresholds, applied to every cell at once, and
the gate) is printed as applied; other changed fields need a restart and are listed. An invalid
file is refused by serve, which keeps its running configuration; the command then exits 1.
"""

from __future__ import annotations

import click

from patchd.cli.options import config_option
from patchd.config import Config


@click.command("reload")
@config_option
def reload(config: Config) -> None:
    """Tell the running serve to re-read its config file (needs a token with the admin scope)."""
    from patchd.api.client import ApiClient

    with ApiClient.from_config(config) as client:
        body = client.post("/v1/config/reload")
    click.echo(f"serve re-read {body['config_file']}")
    for line in body["applied"] or ["nothing (no reloadable field changed)"]:
        click.echo(f"  applied: {line}")
    for field in body["restart_needed"]:
        click.echo(f"  changed, needs a restart: {field}")

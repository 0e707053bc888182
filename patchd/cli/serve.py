"""``patchd serve`` (the daemon) and ``patchd ingest FILE`` (backfill through a running serve)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import click

from patchd.cli.options import config_option, with_overrides
from patchd.config import Config

if TYPE_CHECKING:
    from patchd.api.client import ApiClient

BACKFILL_BATCH = 5000


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


@click.command()
@config_option
@click.option("--host", default=None, help="Listen address (overrides api.host).")
@click.option("--port", type=int, default=None, help="Listen port (overrides api.port).")
def serve(config: Config, host: str | None, port: int | None) -> None:
    """Run the daemon: ingest, monitor, gate, admin API and /metrics."""
    from patchd.daemon import Daemon

    config = with_overrides(config, api={"host": host, "port": port})
    setup_logging(config.log_level)
    sys.exit(Daemon(config).run())


@click.command()
@config_option
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--labels", is_flag=True, help="FILE holds labels ({id, label}), not predictions.")
@click.option("--batch", type=click.IntRange(1, 100_000), default=BACKFILL_BATCH, show_default=True)
def ingest(config: Config, file: Path, labels: bool, batch: int) -> None:
    """Backfill a JSONL file of prediction events (or labels) into the running serve."""
    from patchd.api.client import ApiClient

    route = "/v1/labels" if labels else "/v1/predictions"
    totals = {"accepted": 0, "duplicates": 0, "rejected": 0}
    shown = 0
    with ApiClient.from_config(config, timeout=120) as client, file.open("rb") as fh:
        size = file.stat().st_size
        with click.progressbar(length=size, label=f"ingest {file.name}", file=sys.stderr) as bar:
            first = 0
            for lines in _batches(fh, batch):
                result = _send(client, route, b"".join(lines))
                totals["accepted"] += result["accepted"]
                totals["duplicates"] += result["duplicates"]
                totals["rejected"] += len(result["rejected"])
                for err in result["rejected"][: max(0, 10 - shown)]:
                    click.echo(
                        f"line {first + err['index'] + 1}: {err['reason']}: {err['message']}"
                    )
                    shown += 1
                first += len(lines)
                bar.update(sum(len(line) for line in lines))
    click.echo(
        f"{file}: {totals['accepted']} accepted, {totals['duplicates']} duplicates, "
        f"{totals['rejected']} rejected"
    )


def _batches(fh: BinaryIO, size: int) -> Iterator[list[bytes]]:
    lines: list[bytes] = []
    for line in fh:
        lines.append(line if line.endswith(b"\n") else line + b"\n")
        if len(lines) >= size:
            yield lines
            lines = []
    if lines:
        yield lines


def _send(client: ApiClient, route: str, body: bytes) -> dict[str, Any]:
    """POST one batch; waits and retries while serve answers 429 (queue full) or 503."""
    from patchd.api.client import ApiError

    while True:
        try:
            return client.post(
                route, content=body, headers={"Content-Type": "application/x-ndjson"}
            )
        except ApiError as err:
            if err.status not in (429, 503):
                raise
            time.sleep(2.0)

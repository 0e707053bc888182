"""``patchd bench <name>``: benchmarks, loaded lazily from :data:`BENCHES` (name -> module:command).

Each bench prints a markdown table row (date, machine) and writes JSON under
``benchmarks/results/``. Add a line here for a new bench; its module lives in ``patchd/bench/``.
"""

from __future__ import annotations

import importlib

import click

BENCHES: dict[str, str] = {
    "ingest": "patchd.bench.ingest:ingest",
    "monitor": "patchd.bench.monitor:monitor",
    "models": "patchd.bench.models:models",
    "client": "patchd.bench.client:client",
    "quality": "patchd.bench.quality:quality",
    "mining": "patchd.bench.mining:mining",
    "defuse": "patchd.bench.defuse:defuse",
}


class LazyBenchGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(BENCHES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = BENCHES.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyBenchGroup)
def bench() -> None:
    """Benchmarks (results under benchmarks/results/)."""

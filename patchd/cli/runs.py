"""``patchd worker``, ``patchd runs`` (list, show, cancel, resume) and ``patchd patch`` (trigger
now)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from patchd.api.client import scoped_path
from patchd.cli.options import (
    config_option,
    config_path_option,
    model_option,
    model_view,
    store_group_config,
)
from patchd.cli.safe import cells
from patchd.config import load_config

if TYPE_CHECKING:
    from patchd.config import Config

TERMINAL = ("succeeded", "failed", "cancelled")


def _request(config: Config, method: str, path: str, **kwargs: Any) -> Any:
    """One API call; failures raise ApiError (a PatchdError: one clear line, exit 1)."""
    from patchd.api.client import ApiClient

    with ApiClient.from_config(config) as client:
        return client.request(method, path, **kwargs).json()


@click.command()
@config_option
@click.option("-q", "--queues", multiple=True, help="Queues to take (default: every patch queue).")
@click.option("--burst", is_flag=True, help="Exit when the queues are empty.")
def worker(config: Config, queues: tuple[str, ...], burst: bool) -> None:
    """Run a patch worker (a forking RQ worker for the collect…evaluate stages)."""
    from patchd.workers.worker import run_worker

    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_worker(config, list(queues) or None, burst=burst)


WIDE = 110  # terminal columns from which the table adds the model and creation time


def _elapsed(run: dict[str, Any], now: float) -> str:
    """Wall time of the run: since it was created while open, until its last update once over."""
    end = run.get("updated_at", now) if run["state"] in TERMINAL else now
    return f"{max(0.0, end - run['created_at']):.0f}s"


def _outcome(run: dict[str, Any]) -> str | None:
    """ "no improvement found, incumbent kept: …" for a run that registered no candidate."""
    from patchd.runs.records import outcome_text

    return outcome_text(run.get("outcome"), run.get("outcome_message"))


def _row(run: dict[str, Any], now: float, wide: bool) -> tuple[str, ...]:
    kept = _outcome(run)
    reason = kept or run.get("error") or run.get("reason") or ""
    state = "no improvement" if kept else run["state"]
    if run["state"] == "awaiting_labels":
        reason = awaiting_text(run)
    head = (run["id"], state, run.get("stage") or "-", _elapsed(run, now))
    if not wide:
        return (*head, reason)
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(run["created_at"]))
    return (*head, run["model"], created, reason)


def awaiting_text(run: dict[str, Any]) -> str:
    """What a run paused for region labels waits for, and how to go on."""
    labels = run.get("labels") or {}
    deadline = labels.get("deadline")
    until = (
        time.strftime(" until %Y-%m-%d %H:%M UTC", time.gmtime(deadline))
        if isinstance(deadline, int | float)
        else ""
    )
    return (
        f"{labels.get('regions', '?')} failure regions await labels{until}: "
        f"patchd regions {run['id']} --label REGION=CLASS, then --done"
    )


def resume_run(config: Config, run_id: str) -> dict[str, Any]:
    """``POST /v1/runs/{id}/resume``: the run goes on to train with the labels given."""
    path = scoped_path(config.model.name, f"/v1/runs/{run_id}/resume")
    body: dict[str, Any] = _request(config, "POST", path)
    return body


def print_runs(runs: list[dict[str, Any]], now: float | None = None) -> None:
    """The runs table. Run ids are never cut or wrapped (they are copied into other commands);
    the reason is cut to the width left (``patchd runs show RUN`` has it whole); from
    :data:`WIDE` columns on, the model and the creation time are shown too. A succeeded run
    that kept the incumbent reads ``no improvement`` with the outcome as its reason."""
    from rich.console import Console
    from rich.table import Table

    now = time.time() if now is None else now
    console = Console()
    wide = console.width >= WIDE
    names = ["run", "state", "stage", "elapsed", *(["model", "created (UTC)"] if wide else [])]
    rows = [cells(_row(run, now, wide)) for run in runs]
    table = Table(show_edge=False)
    used = 0
    for i, name in enumerate(names):  # as wide as their longest value: never cut
        width = max([len(name), *(len(row[i]) for row in rows)])
        table.add_column(name, no_wrap=True, min_width=width)
        used += width + 3  # the cell's padding and the column rule
    left = max(8, console.width - used - 2)
    table.add_column("error / reason", no_wrap=True, overflow="ellipsis", max_width=left)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@click.group(invoke_without_command=True)
@config_path_option
@click.option(
    "--model",
    default=None,
    envvar="PATCHD_MODEL",
    help="Only runs of this model (required when several are configured).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def runs(ctx: click.Context, config_path: Path | None, model: str | None, as_json: bool) -> None:
    """List patch runs (subcommands: show, cancel, resume; -c works before or after them)."""
    store_group_config(ctx, config_path)
    if ctx.invoked_subcommand is not None:
        return
    config = load_config(config_path, os.environ)
    if config.several_models:
        path, params = scoped_path(model_view(config, model).model.name, "/v1/runs"), {}
    else:
        path, params = "/v1/runs", {"model": model} if model else {}
    body = _request(config, "GET", path, params=params)
    if as_json:
        import json

        click.echo(json.dumps(body["runs"], indent=2))
    else:
        print_runs(body["runs"])


@runs.command("show")
@click.argument("run_id")
@config_option
@model_option
def show(config: Config, run_id: str) -> None:
    """Show one run as JSON (a run that kept the incumbent says so first, on stderr)."""
    import json

    body = _request(config, "GET", scoped_path(config.model.name, f"/v1/runs/{run_id}"))
    kept = _outcome(body)
    if kept:
        click.echo(f"run {body['id']}: {kept}", err=True)
    if body["state"] == "awaiting_labels":
        click.echo(f"run {body['id']}: {awaiting_text(body)}", err=True)
    click.echo(json.dumps(body, indent=2))


@runs.command("cancel")
@click.argument("run_id")
@config_option
@model_option
def cancel(config: Config, run_id: str) -> None:
    """Cancel a run: queued stages are cancelled, the running one is stopped."""
    body = _request(config, "POST", scoped_path(config.model.name, f"/v1/runs/{run_id}/cancel"))
    click.echo(f"run {body['id']}: {body['state']}")


@runs.command("resume")
@click.argument("run_id")
@config_option
@model_option
def resume(config: Config, run_id: str) -> None:
    """Resume a run awaiting region labels: it trains with the labels given so far."""
    body = resume_run(config, run_id)
    click.echo(f"run {body['id']}: {body['state']} ({body.get('stage')}), resumed")


@click.command()
@config_option
@model_option
@click.option("--reason", default="manual (patchd patch)", help="Recorded on the run.")
@click.option("--miner", default=None)
@click.option("--augmenter", default=None)
@click.option("--trainer", default=None)
@click.option("--epochs", type=int, default=None)
@click.option(
    "--wait", is_flag=True, help="Follow the run until it ends (exit 1 unless it succeeds)."
)
def patch(
    config: Config,
    reason: str,
    miner: str | None,
    augmenter: str | None,
    trainer: str | None,
    epochs: int | None,
    wait: bool,
) -> None:
    """Trigger a patch run now."""
    recipe: dict[str, Any] = {
        k: v
        for k, v in {"miner": miner, "augmenter": augmenter, "trainer": trainer}.items()
        if v is not None
    }
    if epochs is not None:
        recipe["budget"] = {"epochs": epochs}
    body = _request(
        config,
        "POST",
        scoped_path(config.model.name, "/v1/runs"),
        json={"reason": reason, "recipe": recipe or None},
    )
    click.echo(
        f"run {body['id']} {body['state']}" + (f": {body['error']}" if body.get("error") else "")
    )
    if wait:
        _follow(config, body)


def _follow(config: Config, run: dict[str, Any]) -> None:
    last = None
    while run["state"] not in TERMINAL:
        time.sleep(2)
        run = _request(config, "GET", scoped_path(config.model.name, f"/v1/runs/{run['id']}"))
        shown = (run["state"], run.get("stage"))
        if shown != last:
            click.echo(f"  {run['state']:<10} {run.get('stage') or ''}")
            last = shown
    if run["state"] != "succeeded":
        raise click.ClickException(f"run {run['id']} {run['state']}: {run.get('error')}")
    kept = _outcome(run)
    if kept:
        click.echo(f"run {run['id']} succeeded: {kept}; no candidate was registered")
        return
    click.echo(f"run {run['id']} succeeded: {run.get('result')}")

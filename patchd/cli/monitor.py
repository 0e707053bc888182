"""``patchd status``: serve's status and the per-(class, subgroup) table of the monitor.

Reads ``GET /v1/status`` and ``GET /v1/groups`` through :class:`patchd.api.client.ApiClient`;
``--watch`` redraws every few seconds, ``--json`` prints both documents as one JSON object.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import click

from patchd.cli.options import config_option, model_option
from patchd.cli.safe import cell, markup, printable

if TYPE_CHECKING:
    from rich.console import RenderableType

    from patchd.config import Config

STATE_STYLE = {"ok": "green", "warning": "yellow", "degraded": "bold red"}


def fetch(config: Config) -> dict[str, Any]:
    from patchd.api.client import ApiClient, scoped_path

    with ApiClient.from_config(config) as client:
        groups = client.get(scoped_path(config.model.name, "/v1/groups"))
        return {"status": client.get("/v1/status"), "groups": groups}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _accuracy(cell: dict[str, Any]) -> str:
    if not cell["n"]:
        return "-"
    half = (cell["ci_high"] - cell["ci_low"]) / 2 if cell["ci_low"] is not None else 0.0
    return f"{_pct(cell['accuracy'])} ± {100 * half:.1f}"


def _estimate(cell: dict[str, Any]) -> str:
    """The pooled row's label-free estimate, beside its labeled accuracy ("?" when unreliable)."""
    state = cell.get("estimate_state")
    if cell["class"] != "*" or state in (None, "none"):
        return ""
    if cell.get("estimated_accuracy") is None:
        return "[yellow]? unreliable[/]"
    half = (cell["estimated_ci_high"] - cell["estimated_ci_low"]) / 2
    text = f"{_pct(cell['estimated_accuracy'])} ± {100 * half:.1f}"
    return f"[bold red]{text} est. degraded[/]" if state == "estimated_degraded" else text


def _drift(cell: dict[str, Any]) -> str:
    return " ".join(f"{k[:4]}={v:.2f}" for k, v in sorted(cell["drift"].items())) or "-"


def drift_caption(groups: dict[str, Any]) -> str:
    """The drift column's legend, and why it is empty when it is."""
    caption = "drift: label-free signals, never accuracy"
    if any(c["drift"] for c in groups["cells"]):
        return caption + "; '-': too few predictions of that group (monitor.drift_min_samples)"
    if str(groups.get("reference", "")).startswith(("learning", "not started")):
        return caption + "; none until the reference is frozen"
    return caption + (
        "; none yet: the drift pass runs every monitor.drift_interval_s (60 s by default) and "
        "needs monitor.drift_min_samples predictions of a group"
    )


def groups_table(groups: dict[str, Any]) -> RenderableType:
    from rich.table import Table

    worst = groups.get("worst_group_accuracy")
    title = (
        f"model {markup(groups['model'])}: {groups['n']} labeled events in the window, "
        f"reference {markup(groups['reference'])}, worst-group accuracy {_pct(worst)}%"
    )
    table = Table(title=title, caption=drift_caption(groups))
    # est.: the label-free estimate (patchd.monitor.estimate), never used as accuracy
    columns = ("class", "group", "n", "accuracy % (± CI)", "est. % (± CI)", "ref %", "share %")
    for col in (*columns, "drift", "state"):
        table.add_column(col, justify="right" if col in ("n", "ref %", "share %") else "left")
    for c in groups["cells"]:
        state = c["state"]
        table.add_row(
            cell(c["class"]),  # class and group values come from clients: escaped
            cell(c["group"]),
            str(c["n"]),
            _accuracy(c),
            _estimate(c),
            _pct(c["reference_accuracy"]),
            _pct(c["share"]) if c["class"] == "*" else "",
            _drift(c),
            f"[{STATE_STYLE.get(state, '')}]{state}[/]",
        )
    return table


def status_view(doc: dict[str, Any]) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    st = doc["status"]
    model = doc["groups"].get("model") or st.get("model", "?")
    # this model's counts (several models: `models`), else the store's
    store = (st.get("models") or {}).get(model) or st.get("store", {})
    head = Text(
        printable(
            f"patchd {st.get('version', '?')} {st.get('state', '?')}, model "
            f"{model}: {store.get('predictions', '?')} predictions, "
            f"{store.get('labeled', '?')} labeled"
        )
    )
    requests = doc["groups"].get("patch_requests") or []
    tail = Text(
        printable(
            f"patch requests: {len(requests)}"
            + (f", last: {requests[-1]['reason']}" if requests else "")
        )
    )
    return Group(head, groups_table(doc["groups"]), *mined_lines(doc["groups"]), tail)


def mined_lines(groups: dict[str, Any]) -> list[Any]:
    """The mined pseudo-groups (``mined=member``): where from, and each class's description."""
    from rich.text import Text

    mined = groups.get("mined_groups")
    if not mined:
        return []
    if not mined["active"]:
        return [Text(printable(f"mined groups: {mined['note']}"))]
    skipped = ", ".join(f"{k} {v}" for k, v in mined["skipped"].items() if v) or "none"
    head = (
        f"mined groups ({mined['attribute']}=member|rest|unknown) from {mined['note']}, "
        f"embedding dim {mined['embedding_dim']}; labeled events left unknown: {skipped}"
    )
    return [Text(printable(line)) for line in (head, *(f"  {d}" for d in mined["descriptions"]))]


@click.command()
@config_option
@model_option
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--json", "as_json", is_flag=True, help="Print /v1/status and /v1/groups as JSON.")
def status(config: Config, watch: bool, interval: float, as_json: bool) -> None:
    """Serve's status and the per-(class, subgroup) accuracy, drift and alert state."""
    if as_json:
        click.echo(json.dumps(fetch(config), indent=2))
        return
    from rich.console import Console

    console = Console()
    if not watch:
        console.print(status_view(fetch(config)))
        return
    from rich.live import Live

    with Live(status_view(fetch(config)), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            live.update(status_view(fetch(config)))

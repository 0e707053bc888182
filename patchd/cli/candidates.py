"""``patchd candidates``, ``approve``, ``reject``, ``rollback``, ``report`` and ``registry``.

The first five talk to ``patchd serve`` (the only writer of the store and the pointer); ``patchd
registry import/list/gc`` work offline on the registry directory (with an audit line), e.g. to
install the first production model before serve ever ran.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import time
import webbrowser
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
from patchd.cli.safe import cells, printable

if TYPE_CHECKING:
    from patchd.config import Config


def _request(config: Config, method: str, path: str, **kwargs: Any) -> Any:
    from patchd.api.client import ApiClient

    with ApiClient.from_config(config) as client:
        response = client.request(method, path, **kwargs)
        return response.json() if "json" in response.headers.get("content-type", "") else response


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _row(c: dict[str, Any]) -> tuple[str, ...]:
    gate = c.get("gate") or {}
    wg = (
        f"{_pct(gate['incumbent_worst'][1])} -> {_pct(gate['candidate_worst'][1])}" if gate else "-"
    )
    avg = f"{_pct(gate['incumbent_avg'])} -> {_pct(gate['candidate_avg'])}" if gate else "-"
    created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(c["created_at"]))
    return (
        c["id"],
        c["model"],
        c["state"],
        c.get("verdict") or "-",
        wg,
        avg,
        c["digest"][:12],
        created,
    )


@click.command()
@config_option
@click.option(
    "--model",
    default=None,
    envvar="PATCHD_MODEL",
    help="Only candidates of this model (required when several are configured).",
)
@click.option("--state", default=None, help="Only candidates in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def candidates(config: Config, model: str | None, state: str | None, as_json: bool) -> None:
    """List candidates with their gate verdict and worst-group / average accuracy."""
    params = {k: v for k, v in (("model", model), ("state", state)) if v}
    path = "/v1/candidates"
    if config.several_models:
        path = scoped_path(model_view(config, model).model.name, path)
        params = {"state": state} if state else {}
    body = _request(config, "GET", path, params=params)["candidates"]
    if as_json:
        click.echo(json.dumps(body, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "candidate",
        "model",
        "state",
        "verdict",
        "worst group",
        "average",
        "digest",
        "created (UTC)",
    )
    for cand in body:
        table.add_row(*cells(_row(cand)))
    Console().print(table)


def _person(by: str | None) -> str | None:
    """Who is deciding: ``--by``, else the OS user; serve records it beside the token's name."""
    if by:
        return by
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        return None


def _check_person(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    import re

    from patchd.promotion.audit import PERSON_PATTERN

    if value is not None and not re.fullmatch(PERSON_PATTERN, value.strip()):
        raise click.BadParameter("must be 1-64 printable characters", param_hint="--by")
    return value.strip() if value is not None else None


by_option = click.option(
    "--by",
    default=None,
    metavar="NAME",
    callback=_check_person,
    help="Who decides (default: the OS user); recorded with the token's name in the audit log.",
)
yes_option = click.option("--yes", is_flag=True, help="Do not ask for confirmation.")


def _awaiting(config: Config, candidate_id: str, digest: str | None, verb: str) -> dict[str, Any]:
    """The candidate, shown; a ClickException (before any question) unless it awaits approval."""
    cand = _request(config, "GET", scoped_path(config.model.name, f"/v1/candidates/{candidate_id}"))
    shown = digest or cand["digest"]
    click.echo(
        f"{candidate_id}: {cand['state']}, verdict {cand.get('verdict')}, digest {shown[:16]}"
    )
    for reason in (cand.get("gate") or {}).get("reasons", []):
        click.echo(f"  - {printable(reason)}")
    if cand["state"] != "awaiting_approval":
        decided = f" by {printable(cand['decided_by'])}" if cand.get("decided_by") else ""
        raise click.ClickException(
            f"{candidate_id} is {cand['state']}{decided}, not awaiting_approval: only a candidate "
            f"that passed the gate and is waiting can be {verb}"
        )
    return cand


@click.command()
@config_option
@model_option
@click.argument("candidate_id")
@click.option("--digest", default=None, help="Pin the digest you reviewed (default: fetch it).")
@yes_option
@by_option
def approve(
    config: Config, candidate_id: str, digest: str | None, yes: bool, by: str | None
) -> None:
    """Promote a candidate that passed the gate (its digest is sent with the approval)."""
    cand = _awaiting(config, candidate_id, digest, "approved")
    digest = digest or cand["digest"]
    if not yes:
        click.confirm(f"promote {cand['model']}@{digest[:12]} to production?", abort=True)
    body = {"digest": digest, "by": _person(by)}
    path = scoped_path(config.model.name, f"/v1/candidates/{candidate_id}/approve")
    done = _request(config, "POST", path, json=body)
    click.secho(
        f"promoted {done['model']}@{done['digest'][:12]} ({done['id']}), "
        f"recorded as {printable(done.get('decided_by'))}",
        fg="green",
    )


@click.command()
@config_option
@model_option
@click.argument("candidate_id")
@click.option("--reason", default="", help="Why (goes to the audit log).")
@yes_option
@by_option
def reject(config: Config, candidate_id: str, reason: str, yes: bool, by: str | None) -> None:
    """Reject a candidate awaiting approval (final: it can never be promoted afterwards)."""
    cand = _awaiting(config, candidate_id, None, "rejected")
    if not yes:
        click.confirm(f"reject {cand['model']}@{cand['digest'][:12]} for good?", abort=True)
    body = {"reason": reason, "by": _person(by)}
    path = scoped_path(config.model.name, f"/v1/candidates/{candidate_id}/reject")
    done = _request(config, "POST", path, json=body)
    click.echo(f"rejected {done['id']} ({done['model']}@{done['digest'][:12]})")


@click.command()
@config_option
@model_option
@click.option("--digest", default=None, help="Only if this digest is production now.")
@yes_option
@by_option
def rollback(config: Config, digest: str | None, yes: bool, by: str | None) -> None:
    """Roll production back one step (to the previous pointer)."""
    name = config.model.name
    production = _request(config, "GET", scoped_path(name, "/v1/production"))["production"]
    pointer = production.get(name)
    if not pointer:
        raise click.ClickException(f"model {name!r} has no production version to roll back")
    if not pointer.get("previous"):
        raise click.ClickException(
            f"{name}@{pointer['sha256'][:12]} has no previous version to roll back to"
        )
    click.echo(
        f"{name}: production {pointer['sha256'][:12]} (approved by "
        f"{printable(pointer.get('approved_by'))}) -> previous {pointer['previous'][:12]}"
    )
    if not yes:
        click.confirm(f"roll {name} back to {pointer['previous'][:12]}?", abort=True)
    body = {"model": name, "digest": digest or pointer["sha256"], "by": _person(by)}
    done = _request(config, "POST", scoped_path(name, "/v1/rollback"), json=body)
    click.secho(
        f"rolled back {done['model']}: production is now {done['production'][:12]}", fg="yellow"
    )


@click.command()
@config_option
@model_option
@click.argument("candidate_id")
@click.option("--open", "open_browser", is_flag=True, help="Open the HTML in a browser.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
def report(config: Config, candidate_id: str, open_browser: bool, as_json: bool) -> None:
    """Print the path of a candidate's HTML report (beside its manifest), or open it."""
    from patchd.exceptions import NotFoundError
    from patchd.promotion.registry import open_registry

    cand = _request(config, "GET", scoped_path(config.model.name, f"/v1/candidates/{candidate_id}"))
    registry = open_registry(config)
    vdir = registry.version_dir(cand["model"], cand["digest"])
    if registry.blobs is not None:  # fetched from the bucket, each file checked
        with contextlib.suppress(NotFoundError):
            vdir = registry.get(cand["model"], cand["digest"]).path
    if as_json:
        click.echo((vdir / "report.json").read_text())
        return
    path = vdir / "report.html"
    if not path.is_file():  # serve runs elsewhere: fetch the live report
        import tempfile

        route = scoped_path(config.model.name, f"/v1/candidates/{candidate_id}/report")
        html = _request(config, "GET", route).text
        path = Path(tempfile.mkdtemp(prefix="patchd-report-")) / f"{candidate_id}.html"
        path.write_text(html)
    click.echo(str(path))
    if open_browser:
        webbrowser.open(path.as_uri())


@click.group()
@config_path_option
@click.pass_context
def registry(ctx: click.Context, config_path: Path | None) -> None:
    """Work on the model registry directory directly (offline; -c before or after the verb)."""
    store_group_config(ctx, config_path)


@registry.command("import")
@config_option
@click.option(
    "--weights", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option(
    "--model", default=None, help="Model name (default: the only model; several: required)."
)
@click.option("--by", default=None, help="Who approves (default: the OS user).")
def import_cmd(config: Config, weights: Path, model: str | None, by: str | None) -> None:
    """Import a safetensors file as the production version (the first one, typically)."""
    from patchd.promotion.audit import AuditEntry, AuditLog
    from patchd.promotion.registry import open_registry

    if weights.suffix != ".safetensors":
        raise click.ClickException(f"{weights} is not a .safetensors file (no pickles)")
    name = model or model_view(config, None).model.name
    actor = by or f"cli:{getpass.getuser()}"
    reg = open_registry(config)
    before = reg.pointer(name)
    version = reg.import_model(name, weights, actor)
    AuditLog.in_state_dir(config.state_dir).append(
        AuditEntry(
            actor,
            "imported",
            name,
            version.sha256,
            previous=before.sha256 if before else None,
            detail=str(weights.resolve()),
        )
    )
    click.echo(f"imported {name}@{version.sha256[:12]} as production ({version.path})")


@registry.command("list")
@config_option
@click.option(
    "--model", default=None, help="Model name (default: the only model; several: required)."
)
def list_cmd(config: Config, model: str | None) -> None:
    """Versions of a model; the production one is marked."""
    from patchd.promotion.registry import open_registry

    name = model or model_view(config, None).model.name
    reg = open_registry(config)
    pointer = reg.pointer(name)
    for v in reg.versions(name):
        mark = "*" if pointer and v.sha256 == pointer.sha256 else " "
        prev = " (previous)" if pointer and v.sha256 == pointer.previous else ""
        made = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.manifest.created_at))
        click.echo(f"{mark} {v.sha256[:16]}  {made}  run={v.manifest.run_id or '-'}{prev}")

"""``patchd candidates``, ``approve``, ``reject``, ``rollback``, ``report`` and ``registry``.

The first five talk to ``patchd serve`` (the only writer of the store and the pointer); ``patchd
registry import/list/gc`` work offline on the registry directory (with an audit line), e.g. to
install the first production model before serve ever ran.
"""

from __future__ import annotations

import getpass
import json
import time
import webbrowser
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from patchd.cli.options import config_option
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
@click.option("--model", default=None, help="Only candidates of this model.")
@click.option("--state", default=None, help="Only candidates in this state.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def candidates(config: Config, model: str | None, state: str | None, as_json: bool) -> None:
    """List candidates with their gate verdict and worst-group / average accuracy."""
    params = {k: v for k, v in (("model", model), ("state", state)) if v}
    body = _request(config, "GET", "/v1/candidates", params=params)["candidates"]
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


@click.command()
@config_option
@click.argument("candidate_id")
@click.option("--digest", default=None, help="Pin the digest you reviewed (default: fetch it).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def approve(config: Config, candidate_id: str, digest: str | None, yes: bool) -> None:
    """Promote a candidate that passed the gate (its digest is sent with the approval)."""
    cand = _request(config, "GET", f"/v1/candidates/{candidate_id}")
    digest = digest or cand["digest"]
    gate = cand.get("gate") or {}
    click.echo(
        f"{candidate_id}: {cand['state']}, verdict {cand.get('verdict')}, digest {digest[:16]}"
    )
    for reason in gate.get("reasons", []):
        click.echo(f"  - {printable(reason)}")
    if not yes:
        click.confirm(f"promote {cand['model']}@{digest[:12]} to production?", abort=True)
    done = _request(
        config, "POST", f"/v1/candidates/{candidate_id}/approve", json={"digest": digest}
    )
    click.secho(f"promoted {done['model']}@{done['digest'][:12]} ({done['id']})", fg="green")


@click.command()
@config_option
@click.argument("candidate_id")
@click.option("--reason", default="", help="Why (goes to the audit log).")
def reject(config: Config, candidate_id: str, reason: str) -> None:
    """Reject a candidate awaiting approval."""
    done = _request(
        config, "POST", f"/v1/candidates/{candidate_id}/reject", json={"reason": reason}
    )
    click.echo(f"rejected {done['id']} ({done['model']}@{done['digest'][:12]})")


@click.command()
@config_option
@click.option("--model", default=None, help="Model to roll back (default: model.name).")
@click.option("--digest", default=None, help="Only if this digest is production now.")
def rollback(config: Config, model: str | None, digest: str | None) -> None:
    """Roll production back one step (to the previous pointer)."""
    body = {"model": model or config.model.name, "digest": digest}
    done = _request(config, "POST", "/v1/rollback", json=body)
    click.secho(
        f"rolled back {done['model']}: production is now {done['production'][:12]}", fg="yellow"
    )


@click.command()
@config_option
@click.argument("candidate_id")
@click.option("--open", "open_browser", is_flag=True, help="Open the HTML in a browser.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report.")
def report(config: Config, candidate_id: str, open_browser: bool, as_json: bool) -> None:
    """Print the path of a candidate's HTML report (beside its manifest), or open it."""
    from patchd.promotion.registry import Registry

    cand = _request(config, "GET", f"/v1/candidates/{candidate_id}")
    vdir = Registry(config.registry_root).version_dir(cand["model"], cand["digest"])
    if as_json:
        click.echo((vdir / "report.json").read_text())
        return
    path = vdir / "report.html"
    if not path.is_file():  # serve runs elsewhere: fetch the live report
        import tempfile

        html = _request(config, "GET", f"/v1/candidates/{candidate_id}/report").text
        path = Path(tempfile.mkdtemp(prefix="patchd-report-")) / f"{candidate_id}.html"
        path.write_text(html)
    click.echo(str(path))
    if open_browser:
        webbrowser.open(path.as_uri())


@click.group()
def registry() -> None:
    """Work on the model registry directory directly (offline)."""


@registry.command("import")
@config_option
@click.option(
    "--weights", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--model", default=None, help="Model name (default: model.name).")
@click.option("--by", default=None, help="Who approves (default: the OS user).")
def import_cmd(config: Config, weights: Path, model: str | None, by: str | None) -> None:
    """Import a safetensors file as the production version (the first one, typically)."""
    from patchd.promotion.audit import AuditEntry, AuditLog
    from patchd.promotion.registry import Registry

    if weights.suffix != ".safetensors":
        raise click.ClickException(f"{weights} is not a .safetensors file (no pickles)")
    name = model or config.model.name
    actor = by or f"cli:{getpass.getuser()}"
    reg = Registry(config.registry_root)
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
@click.option("--model", default=None, help="Model name (default: model.name).")
def list_cmd(config: Config, model: str | None) -> None:
    """Versions of a model; the production one is marked."""
    from patchd.promotion.registry import Registry

    name = model or config.model.name
    reg = Registry(config.registry_root)
    pointer = reg.pointer(name)
    for v in reg.versions(name):
        mark = "*" if pointer and v.sha256 == pointer.sha256 else " "
        prev = " (previous)" if pointer and v.sha256 == pointer.previous else ""
        made = time.strftime("%Y-%m-%d %H:%M", time.gmtime(v.manifest.created_at))
        click.echo(f"{mark} {v.sha256[:16]}  {made}  run={v.manifest.run_id or '-'}{prev}")

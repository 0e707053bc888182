"""``patchd demo``: the whole loop end to end on this machine."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.command()
@click.option("--fast", is_flag=True, help="colored-digits and small budgets (about 3 minutes).")
@click.option(
    "--approve",
    "auto_approve",
    is_flag=True,
    help="Approve the candidate automatically instead of waiting for `patchd approve`.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Working directory (default ./.patchd-demo or ./.patchd-demo-fast); reused.",
)
def demo(fast: bool, auto_approve: bool, workdir: Path | None) -> None:
    """Train a model with a colour shortcut, serve it, watch a subgroup fail, patch, promote."""
    from rich.console import Console

    from patchd.demo.plan import make_plan
    from patchd.demo.runner import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    console = Console()
    root = workdir or Path(".patchd-demo-fast" if fast else ".patchd-demo")
    plan = make_plan(root.resolve(), fast=fast)
    if not fast and not Path("/usr/share/datasets/fashion-mnist").is_dir():
        console.print(
            "[yellow]dataset-fashion-mnist is not installed "
            "(sudo apt-get install dataset-fashion-mnist): using colored-digits[/]"
        )
        plan = make_plan(root.resolve(), fast=True)
    try:
        run_demo(plan, auto_approve, console)
    except KeyboardInterrupt:
        console.print("interrupted: everything the demo started has been stopped")
        raise SystemExit(130) from None

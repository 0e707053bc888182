"""Terminal output never carries a client's control characters or rich markup raw."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from patchd.cli.monitor import groups_table, status_view
from patchd.cli.runs import print_runs
from patchd.cli.safe import printable

HOSTILE = "B\x1b]0;owned\x07\x1b[2J[bold red]x[/]\u202eevil\r"


def render(renderable: object) -> str:
    buf = io.StringIO()
    Console(file=buf, width=400, color_system=None, force_terminal=True).print(renderable)
    return buf.getvalue()


def doc(value: str) -> dict[str, object]:
    cell = {
        "class": value, "group": f"site={value}", "n": 5, "accuracy": 0.5, "ci_low": 0.4,
        "ci_high": 0.6, "reference_accuracy": 0.6, "share": 0.5, "drift": {}, "state": "ok",
    }  # fmt: skip
    return {"model": value, "n": 5, "reference": value, "worst_group_accuracy": 0.5,
            "cells": [cell], "patch_requests": [{"reason": value}]}  # fmt: skip


def test_printable_escapes_every_control_character() -> None:
    assert printable("a\x1b[31mb\x00\x7f\x9b\u202ec\n") == "a\\x1b[31mb\\x00\\x7f\\x9b\\u202ec\\n"
    assert printable("plain, ünïcode ✓") == "plain, ünïcode ✓"


def test_status_and_runs_tables_escape_client_values(monkeypatch: pytest.MonkeyPatch) -> None:
    status = {"status": {"version": "1", "state": "running", "model": HOSTILE, "store": {}}}
    outputs = [
        render(groups_table(doc(HOSTILE))),
        render(status_view({**status, "groups": doc(HOSTILE)})),
    ]
    buf = io.StringIO()
    run = {"id": HOSTILE, "model": "m", "state": "failed", "created_at": 0.0, "reason": HOSTILE}
    console = Console(file=buf, width=400, color_system=None, force_terminal=True)
    monkeypatch.setattr("rich.console.Console", lambda: console)
    print_runs([run])
    outputs.append(buf.getvalue())
    for out in outputs:
        assert "\x1b]" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
        assert "\\x1b]0;owned\\x07" in out
        assert "[bold red]x[/]" in out  # markup shown as typed, not interpreted

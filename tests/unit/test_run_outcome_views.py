"""A run that kept the incumbent says so where a person looks: the UI runs page, ``patchd runs``."""

from __future__ import annotations

import pytest

from patchd.cli.runs import print_runs
from patchd.runs.records import NO_IMPROVEMENT_TEXT, RunRecord, outcome_text
from patchd.ui import views
from patchd.ui.component import _environment

MESSAGE = (
    "no fine-tuning epoch beat the incumbent on validation; incumbent kept "
    "(incumbent val worst-group 0.600, best of 2 epoch(s) 0.580 (epoch 2))"
)


def _run(run_id: str, outcome: str) -> RunRecord:
    result = {"stage": "evaluate", "result": {"outcome": outcome, "message": MESSAGE}}
    times = {"collect": 1.0, "mine": 1.0, "synthesize": 1.0, "train": 1.0, "evaluate": 0.1}
    return RunRecord(
        run_id, "m", "succeeded", "evaluate", "manual", {}, {}, times, None, result, 0.0, 9.0
    )


def test_the_outcome_text_names_no_improvement_and_the_message() -> None:
    kept = _run("r-kept", "no_improvement")
    assert kept.outcome_text == f"no improvement found, incumbent kept: {MESSAGE}"
    assert _run("r-cand", "candidate").outcome_text is None
    assert outcome_text("no_improvement", None) == NO_IMPROVEMENT_TEXT


def test_the_ui_runs_page_shows_no_improvement() -> None:
    records = [_run("r-kept", "no_improvement"), _run("r-cand", "candidate")]
    html = (
        _environment()
        .get_template("runs.html")
        .render(
            session=None,
            flash=None,
            model_name="m",
            nav="runs",
            runs=[views.run_view(r) for r in records],
            with_regions=set(),
            v=views,
        )
    )
    kept, candidate = html.split('<tr id="r-cand">')
    assert '<span class="state s-no_improvement">no improvement</span>' in kept
    assert f"no improvement found, incumbent kept: {MESSAGE}" in kept
    assert "no candidate was registered" in kept
    assert "s-succeeded" in candidate and "no improvement" not in candidate


def test_the_runs_table_shows_no_improvement(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    print_runs([_run("r-kept", "no_improvement").to_dict(), _run("r-cand", "candidate").to_dict()])
    lines = capsys.readouterr().out.splitlines()
    kept = next(line for line in lines if "r-kept" in line)
    assert "no improvement" in kept and "no improvement found" in kept
    assert "succeeded" not in kept
    assert "succeeded" in next(line for line in lines if "r-cand" in line)

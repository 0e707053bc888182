"""Generates patchd's Grafana dashboards (deploy/grafana/dashboards/*.json).

The JSON files are committed (Grafana provisioning reads them); this script is their source, so a
change is made here and the files regenerated::

    python deploy/grafana/build_dashboards.py          # rewrite the JSON files
    python deploy/grafana/build_dashboards.py --check  # exit 1 when a file is out of date

Every query uses only metrics in deploy/monitoring/metrics.txt (plus `up`); a test checks it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | stat | table | state-timeline | bargauge
    queries: tuple[Query, ...]
    width: int = 12
    height: int = 8
    unit: str = "short"
    description: str = ""
    minmax: tuple[float, float] | None = None
    thresholds: tuple[tuple[str, float | None], ...] = (("green", None),)
    mappings: tuple[dict[str, Any], ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
    transformations: tuple[dict[str, Any], ...] = ()


def _targets(queries: tuple[Query, ...]) -> list[dict[str, Any]]:
    out = []
    for i, q in enumerate(queries):
        target = {"datasource": DS, "expr": q.expr, "legendFormat": q.legend, "refId": chr(65 + i)}
        target.update({"instant": q.instant, "range": not q.instant})
        if q.table:
            target["format"] = "table"
        out.append(target)
    return out


def _field_config(p: Panel) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for c, v in p.thresholds]
    defaults: dict[str, Any] = {
        "unit": p.unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "mappings": list(p.mappings),
    }
    if p.minmax is not None:
        defaults["min"], defaults["max"] = p.minmax
    if p.kind == "timeseries" and len(p.thresholds) > 1:
        defaults["custom"] = {"thresholdsStyle": {"mode": "line+area"}}
    return {"defaults": defaults, "overrides": []}


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "targets": _targets(p.queries),
        "fieldConfig": _field_config(p),
        "options": p.options,
        "transformations": list(p.transformations),
    }


def _row(title: str, pid: int, y: int) -> dict[str, Any]:
    return {"id": pid, "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}  # fmt: skip


def _layout(rows: list[tuple[str, list[Panel]]]) -> list[dict[str, Any]]:
    """Rows of panels, left to right, wrapping at Grafana's 24 columns."""
    out: list[dict[str, Any]] = []
    y = 0
    for title, panels in rows:
        out.append(_row(title, len(out) + 1, y))
        y, x, row_h = y + 1, 0, 0
        for p in panels:
            if x + p.width > 24:
                y, x, row_h = y + row_h, 0, 0
            out.append(_panel(p, len(out) + 1, x, y))
            x, row_h = x + p.width, max(row_h, p.height)
        y += row_h
    return out


def _variable(name: str, query: str, multi: bool = False) -> dict[str, Any]:
    return {
        "name": name, "label": name, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"var-{name}"}, "definition": query,
        "refresh": 2, "sort": 1, "multi": multi, "includeAll": multi,
        "current": {}, "options": [], "hide": 0,
    }  # fmt: skip


DATASOURCE_VAR = {
    "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
    "current": {}, "hide": 0, "refresh": 1, "options": [],
}  # fmt: skip


def dashboard(uid: str, title: str, rows: list[tuple[str, list[Panel]]],
              variables: list[dict[str, Any]], description: str) -> dict[str, Any]:  # fmt: skip
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["patchd"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [DATASOURCE_VAR, *variables]},
        "annotations": {"list": []},
        "links": [
            {
                "title": "patchd dashboards",
                "type": "dashboards",
                "tags": ["patchd"],
                "asDropdown": True,
            }
        ],  # fmt: skip
        "panels": _layout(rows),
    }


RATIO = {"unit": "percentunit", "minmax": (0.0, 1.0)}
ACC_STEPS = (("red", None), ("orange", 0.6), ("green", 0.8))
STATE_MAP = (
    {"type": "value", "options": {
        "0": {"text": "ok", "color": "green"},
        "1": {"text": "warning", "color": "orange"},
        "2": {"text": "degraded", "color": "red"}}},
)  # fmt: skip
# 0 ok, 1 warning, 2 degraded, per cell (patchd_alert_state has 1 on the current state)
_CELL_SEL = 'model="$model",class=~"$class"'
CELL_STATE = (
    f'sum by (class, group) (patchd_alert_state{{{_CELL_SEL},state="warning"}})'
    f' + 2 * sum by (class, group) (patchd_alert_state{{{_CELL_SEL},state="degraded"}})'
)


def _fleet_health() -> list[Panel]:
    return [
        Panel("serve up", "stat", (Query('up{job="patchd"}', "{{instance}}"),), width=4,
              height=4, mappings=({"type": "value", "options": {
                  "0": {"text": "DOWN", "color": "red"}, "1": {"text": "UP", "color": "green"}}},)),
        Panel("Version", "stat", (Query("patchd_build_info", "{{version}}", instant=True),),
              width=4, height=4,
              options={"textMode": "name", "reduceOptions": {"calcs": ["lastNotNull"]}}),
        Panel("Degraded cells", "stat",
              (Query('sum(patchd_alert_state{class!="*",state="degraded"})'),),
              width=4, height=4, thresholds=(("green", None), ("red", 1))),
        Panel("Warning cells", "stat",
              (Query('sum(patchd_alert_state{class!="*",state="warning"})'),),
              width=4, height=4, thresholds=(("green", None), ("orange", 1))),
        Panel("Awaiting approval", "stat",
              (Query('sum(patchd_candidates{state="awaiting_approval"})'),), width=4, height=4,
              thresholds=(("green", None), ("blue", 1))),
        Panel("Longest wait for approval", "stat",
              (Query("max(patchd_awaiting_approval_seconds)"),), width=4, height=4, unit="s",
              thresholds=(("green", None), ("orange", 172800))),
    ]  # fmt: skip


def _fleet_ingest() -> list[Panel]:
    return [
        Panel("Predictions ingested / s by source", "timeseries", (Query(
            "sum by (source) (rate(patchd_predictions_ingested_total[$__rate_interval]))",
            "{{source}}"),), width=8, unit="reqps"),
        Panel("Rejected / s by source and reason", "timeseries", (Query(
            "sum by (source, reason) (rate(patchd_ingest_rejected_total[$__rate_interval]))",
            "{{source}}: {{reason}}"),), width=8, unit="reqps"),
        Panel("Labels joined / s", "timeseries", (Query(
            "sum(rate(patchd_labels_joined_total[$__rate_interval]))", "joined"),),
            width=8, unit="reqps"),
        Panel("Capture failures / s (adapters; also in the rejected panel)", "timeseries", (
            Query("sum by (source, reason) "
                  "(rate(patchd_capture_rejected_total[$__rate_interval]))",
                  "{{source}} rejected: {{reason}}"),
            Query("sum by (source) (rate(patchd_capture_events_total[$__rate_interval]))",
                  "{{source}} events received"),
        ), width=12, unit="reqps", description="CloudEvents the KServe / Seldon adapters "
            "rejected before ingest (PatchdCaptureRejecting), beside what they received; each "
            "is also one patchd_ingest_rejected_total count of the same source and reason."),
        Panel("Inputs dropped / s (prediction kept)", "timeseries", (
            Query("sum by (source, reason) "
                  "(rate(patchd_capture_inputs_dropped_total[$__rate_interval]))",
                  "{{source}}: {{reason}}"),
            Query("sum by (source, reason) "
                  "(rate(patchd_ingest_inputs_dropped_total[$__rate_interval]))",
                  "{{source}}: {{reason}}"),
        ), width=12, unit="reqps", description="Unusable input URIs or bytes removed from "
            "events that were stored without them (no patching material for those)."),
    ]  # fmt: skip


def _fleet_models() -> list[Panel]:
    return [
        Panel("Worst-group accuracy per model", "timeseries",
              (Query("patchd_worst_group_accuracy_ratio", "{{model}}"),), width=12,
              thresholds=ACC_STEPS, description="Accuracy of the worst (class x subgroup) cell "
              "with at least monitor.n_min labeled samples.", **RATIO),
        Panel("Cells per state and model", "bargauge",
              (Query('sum by (model, state) (patchd_alert_state{class!="*"})',
                     "{{model}} {{state}}", instant=True),), width=12,
              options={"displayMode": "basic", "orientation": "horizontal"}),
        Panel("Rows not ok (class * pools a subgroup's classes)", "table", (Query(
            'patchd_alert_state{state!="ok"} == 1', instant=True, table=True),), width=24,
            transformations=({"id": "organize", "options": {"excludeByName": {
                "Time": True, "Value": True, "__name__": True, "job": True, "instance": True}}},)),
    ]  # fmt: skip


def fleet() -> dict[str, Any]:
    return dashboard(
        "patchd-fleet", "patchd / Fleet overview",
        [("Health", _fleet_health()), ("Ingest", _fleet_ingest()), ("Models", _fleet_models())],
        [],
        "Is patchd up, is it ingesting, and which models have a failing subgroup.",
    )  # fmt: skip


def subgroups() -> dict[str, Any]:
    sel = 'model="$model",class=~"$class"'
    cells = [
        Panel("Accuracy and samples per cell", "table", (
            Query(f"patchd_group_accuracy_ratio{{{sel}}}", instant=True, table=True),
            Query(f"patchd_group_samples{{{sel}}}", instant=True, table=True),
            Query(CELL_STATE, instant=True, table=True)), width=12, height=10,
            transformations=(
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {
                    "excludeByName": {"Time": True, "job": True, "instance": True, "model": True},
                    "renameByName": {"Value #A": "accuracy", "Value #B": "samples",
                                     "Value #C": "state"}}}),
            mappings=STATE_MAP),
        Panel("Worst-group accuracy", "stat",
              (Query('patchd_worst_group_accuracy_ratio{model="$model"}'),), width=4, height=10,
              thresholds=ACC_STEPS, **RATIO),
        Panel("State per cell", "state-timeline", (Query(CELL_STATE, "{{class}} / {{group}}"),),
              width=8, height=10, mappings=STATE_MAP,
              thresholds=(("green", None), ("orange", 1), ("red", 2))),
        Panel("Accuracy per cell", "timeseries", (Query(
            f"patchd_group_accuracy_ratio{{{sel}}}", "{{class}} / {{group}}"),), width=12,
            thresholds=ACC_STEPS, **RATIO),
        Panel("Labeled samples per cell (window)", "timeseries", (Query(
            f"patchd_group_samples{{{sel}}}", "{{class}} / {{group}}"),), width=12),
    ]  # fmt: skip
    shift = [
        Panel("Share of traffic per group", "timeseries", (Query(
            'patchd_group_share_ratio{model="$model"}', "{{group}}"),), width=12,
            options={"tooltip": {"mode": "multi"}}, **RATIO),
        Panel("Drift score per group and feature", "timeseries", (Query(
            'patchd_drift_score{model="$model"}', "{{group}} {{feature}}"),), width=12,
            thresholds=(("green", None), ("orange", 0.1)),
            description="Label-free: inputs or predictions changed; not an accuracy measure."),
    ]  # fmt: skip
    estimate = [
        Panel("Estimated (label-free) vs labeled accuracy per group", "timeseries", (
            Query('patchd_estimated_accuracy_ratio{model="$model",class="*"}',
                  "estimated {{group}}"),
            Query('patchd_estimated_accuracy_lower_ratio{model="$model",class="*"}',
                  "estimated low {{group}}"),
            Query('patchd_estimated_accuracy_upper_ratio{model="$model",class="*"}',
                  "estimated high {{group}}"),
            Query('patchd_group_accuracy_ratio{model="$model",class="*"}',
                  "labeled {{group}}")), width=12, thresholds=ACC_STEPS,
            description="Estimated from predictions alone, before labels arrive (gaps: the "
                        "estimate is unreliable); never used as accuracy.", **RATIO),
        Panel("Estimated degraded / unreliable", "state-timeline", (
            Query('patchd_estimated_degraded{model="$model"}', "degraded {{class}} / {{group}}"),
            Query('1 - patchd_estimate_reliable{model="$model"}',
                  "unreliable {{class}} / {{group}}")), width=12,
            thresholds=(("green", None), ("red", 1))),
    ]  # fmt: skip
    variables = [
        _variable("model", "label_values(patchd_group_accuracy_ratio, model)"),
        _variable("class", 'label_values(patchd_group_accuracy_ratio{model="$model"}, class)',
                  multi=True),
    ]  # fmt: skip
    return dashboard(
        "patchd-subgroups", "patchd / Model subgroups",
        [("Cells (class x subgroup)", cells), ("Label-free estimate", estimate),
         ("Traffic mix and drift", shift)], variables,
        "Per-model view: accuracy per (class, subgroup) cell with sample counts, shares, drift.",
    )  # fmt: skip


_PICKED = '{model=~"$model"}'  # the models picked in the `model` variable


def pipeline() -> dict[str, Any]:
    runs = [
        Panel("Runs finished by result (range)", "bargauge", (Query(
            f"sum by (result) (increase(patchd_runs_total{_PICKED}[$__range]))", "{{result}}",
            instant=True),), width=8, options={"displayMode": "basic"}),
        Panel("Runs finished per hour", "timeseries", (Query(
            f"sum by (result) (increase(patchd_runs_total{_PICKED}[1h]))", "{{result}}"),),
            width=16),
        Panel("Stages completed per hour", "timeseries", (Query(
            f"sum by (stage) (increase(patchd_run_stage_seconds_count{_PICKED}[1h]))",
            "{{stage}}"),), width=8),
        Panel("Mean stage duration (range)", "bargauge", (Query(
            f"sum by (stage) (increase(patchd_run_stage_seconds_sum{_PICKED}[$__range]))"
            f" / sum by (stage) (increase(patchd_run_stage_seconds_count{_PICKED}[$__range]))",
            "{{stage}}", instant=True),), width=8, unit="s",
            options={"displayMode": "basic", "orientation": "horizontal"}),
        Panel("Stage duration p90 (6h window)", "timeseries", (Query(
            "histogram_quantile(0.9, sum by (stage, le) "
            f"(increase(patchd_run_stage_seconds_bucket{_PICKED}[6h])))", "{{stage}}"),), width=8,
            unit="s"),
        Panel("Scheduler job errors per hour (monitor, runs, candidates)", "timeseries", (Query(
            f"sum by (model, job) (increase(patchd_job_errors_total{_PICKED}[1h]))",
            "{{model}} {{job}}"),), width=24),
    ]  # fmt: skip
    gate = [
        Panel("Candidates by state", "timeseries", (Query(
            f"sum by (state) (patchd_candidates{_PICKED})", "{{state}}"),), width=12,
            options={"tooltip": {"mode": "multi"}}),
        Panel("Longest wait for approval", "stat", (Query(
            f"max(patchd_awaiting_approval_seconds{_PICKED})"),), width=4, unit="s",
            thresholds=(("green", None), ("orange", 172800))),
        Panel("Promotions by result (range)", "bargauge", (Query(
            f"sum by (result) (increase(patchd_promotions_total{_PICKED}[$__range]))", "{{result}}",
            instant=True),), width=8, options={"displayMode": "basic"}),
    ]  # fmt: skip
    return dashboard(
        "patchd-pipeline", "patchd / Patch pipeline",
        [("Runs and stages", runs), ("Gate and promotion", gate)],
        [_variable("model", "label_values(patchd_runs_total, model)", multi=True)],
        "Patch runs by result and stage, stage durations, candidates and promotions"
        " (of the models picked in `model`).",
    )  # fmt: skip


DASHBOARDS = {"fleet.json": fleet, "subgroups.json": subgroups, "pipeline.json": pipeline}


def render(builder: Any) -> str:
    return json.dumps(builder(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    stale = []
    for name, builder in DASHBOARDS.items():
        path, text = OUT / name, render(builder)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
            continue
        OUT.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stale:
        sys.stderr.write(f"out of date: {', '.join(stale)}; run {argv[0]}\n")
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

"""The deploy side's view of patchd's metrics: the canonical list, PromQL name extraction, and the
Kubernetes PrometheusRule generated from the rule file.

Used by ``tests/integration/test_deploy_*.py`` (loaded by path: ``deploy/`` is not a package) and
as a script::

    python deploy/monitoring/catalog.py sync-k8s    # rewrite deploy/k8s/prometheusrule.yaml
    python deploy/monitoring/catalog.py check-k8s   # exit 1 when it is out of date
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[1]
METRICS_FILE = DEPLOY / "monitoring" / "metrics.txt"
RULES_FILE = DEPLOY / "monitoring" / "rules" / "patchd.rules.yml"
K8S_RULE_FILE = DEPLOY / "k8s" / "prometheusrule.yaml"

# Names a query may use besides patchd's own metrics: Prometheus' per-target `up` and the
# recording rule users define from their model server (see the rule file's header).
EXTERNAL_NAMES = frozenset({"up", "patchd:model_server_requests:rate5m"})
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
    }
)


@dataclass(frozen=True)
class Metric:
    name: str
    type: str  # counter | gauge | histogram
    owner: str  # the serve component that implements it: ingest | monitor | pipeline | gate
    labels: tuple[str, ...]

    def series_names(self) -> tuple[str, ...]:
        """Names Prometheus stores for this metric."""
        if self.type == "histogram":
            return tuple(self.name + s for s in HISTOGRAM_SUFFIXES)
        return (self.name,)


def load_metrics(path: Path = METRICS_FILE) -> tuple[Metric, ...]:
    """Parse metrics.txt: ``name type owner labels`` per line, ``#`` comments."""
    out = []
    for line in path.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        name, kind, owner, labels = fields
        out.append(Metric(name, kind, owner, tuple(x for x in labels.split(",") if x != "-")))
    return tuple(out)


def known_series_names(metrics: tuple[Metric, ...]) -> frozenset[str]:
    return frozenset(n for m in metrics for n in m.series_names()) | EXTERNAL_NAMES


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def promql_metric_names(expr: str) -> frozenset[str]:
    """Metric names a PromQL expression reads (label names, functions, keywords removed)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub("1", text)
    names = {m.group(1) for m in _IDENT.finditer(text)}
    return frozenset(n for n in names if n.lower() not in PROMQL_KEYWORDS)


def load_rules(path: Path = RULES_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def prometheus_rule_manifest(rules: dict[str, Any]) -> dict[str, Any]:
    """The kube-prometheus PrometheusRule carrying exactly the rule file's groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "patchd",
            "namespace": "patchd",
            "labels": {"app.kubernetes.io/name": "patchd", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rules["groups"]},
    }


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (PromQL) as literal blocks, as in the rule file."""


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def render_k8s_rule(rules: dict[str, Any]) -> str:
    header = (
        "# GENERATED from deploy/monitoring/rules/patchd.rules.yml: do not edit by hand.\n"
        "# Regenerate with `python deploy/monitoring/catalog.py sync-k8s` (a test checks it).\n"
        "# The `release` label must match your kube-prometheus-stack's ruleSelector.\n"
    )
    body = yaml.dump(
        prometheus_rule_manifest(rules), Dumper=_BlockDumper, sort_keys=False, width=100
    )
    return header + body


def main(argv: list[str]) -> int:
    wanted = render_k8s_rule(load_rules())
    if argv[1:] == ["sync-k8s"]:
        K8S_RULE_FILE.write_text(wanted)
        return 0
    if argv[1:] == ["check-k8s"]:
        current = K8S_RULE_FILE.read_text() if K8S_RULE_FILE.exists() else ""
        if current != wanted:
            sys.stderr.write(f"{K8S_RULE_FILE} is out of date: run `{argv[0]} sync-k8s`\n")
            return 1
        return 0
    sys.stderr.write(f"usage: {argv[0]} sync-k8s|check-k8s\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))

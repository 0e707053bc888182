"""The shipped Prometheus alert rules: promtool check + unit tests, coverage, names, runbooks."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES_DIR = ROOT / "deploy" / "monitoring" / "rules"
RULES = RULES_DIR / "patchd.rules.yml"
RULE_TESTS = sorted((RULES_DIR / "tests").glob("*.yml"))

pytestmark = pytest.mark.integration


def load_catalog() -> ModuleType:
    """deploy/monitoring/catalog.py (deploy/ is not a package)."""
    name = "patchd_deploy_catalog"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "deploy/monitoring/catalog.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def promtool() -> str:
    found = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if found is None:
        pytest.fail("promtool is missing: `make setup` installs the Debian package `prometheus`")
    return found


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def github_anchor(heading: str) -> str:
    """GitHub's heading slug: lowercase, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def doc_anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {github_anchor(line.lstrip("#")) for line in lines if re.match(r"^#{1,6} ", line)}


def test_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    assert RULE_TESTS, "no rule tests in deploy/monitoring/rules/tests/"
    result = run_promtool("test", "rules", *(p.name for p in RULE_TESTS), cwd=RULES_DIR / "tests")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def _alert_cases() -> dict[str, dict[str, int]]:
    """alertname -> how many checks expect it firing / expect nothing."""
    cases: dict[str, dict[str, int]] = {}
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                seen = cases.setdefault(check["alertname"], {"firing": 0, "silent": 0})
                seen["firing" if check.get("exp_alerts") else "silent"] += 1
    return cases


def test_every_alert_has_firing_and_silent_tests() -> None:
    catalog = load_catalog()
    cases = _alert_cases()
    for rule in catalog.alert_rules(catalog.load_rules()):
        seen = cases.get(rule["alert"], {"firing": 0, "silent": 0})
        assert seen["firing"] >= 1, f"{rule['alert']}: no promtool test where it fires"
        assert seen["silent"] >= 1, f"{rule['alert']}: no promtool test where it stays silent"


def test_rule_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests can fail: drop the low-sample guard and the worst-group test must break."""
    text = RULES.read_text()
    broken = text.replace('patchd_group_samples{class!="*"} >= 30', "patchd_group_samples >= 0")
    assert broken != text, "the worst-group sample guard is not where this test expects it"
    (tmp_path / "tests").mkdir()
    (tmp_path / "patchd.rules.yml").write_text(broken)
    for path in RULE_TESTS:
        shutil.copy(path, tmp_path / "tests" / path.name)
    result = run_promtool("test", "rules", "monitor.test.yml", cwd=tmp_path / "tests")
    assert result.returncode != 0, result.stdout
    assert "PatchdWorstGroupAccuracyLow" in result.stdout + result.stderr


def test_capture_rule_tests_catch_a_source_that_only_rejects(tmp_path: Path) -> None:
    """A logger whose every event is rejected has no received series: without the `or ... * 0`
    fallback PatchdCaptureRejecting would stay silent for it, and capture.test.yml must say so."""
    text = RULES.read_text()
    fallback = (
        "              sum by (source) (rate(patchd_capture_events_total[10m]))\n"
        "                or\n"
        "              sum by (source) (rate(patchd_capture_rejected_total[10m])) * 0\n"
    )
    assert fallback in text, "the capture rule's fallback is not where this test expects it"
    broken = text.replace(
        fallback, "              sum by (source) (rate(patchd_capture_events_total[10m]))\n"
    )
    (tmp_path / "tests").mkdir()
    (tmp_path / "patchd.rules.yml").write_text(broken)
    shutil.copy(RULES_DIR / "tests" / "capture.test.yml", tmp_path / "tests")
    result = run_promtool("test", "rules", "capture.test.yml", cwd=tmp_path / "tests")
    assert result.returncode != 0, result.stdout
    assert 'source="kserve-canary"' in result.stdout + result.stderr


def test_rules_use_only_exported_metric_names() -> None:
    catalog = load_catalog()
    known = catalog.known_series_names(catalog.load_metrics())
    for rule in (r for g in catalog.load_rules()["groups"] for r in g["rules"]):
        unknown = catalog.promql_metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {unknown}"


@pytest.mark.parametrize("field", ["summary", "description", "runbook_url"])
def test_every_alert_is_annotated(field: str) -> None:
    catalog = load_catalog()
    for rule in catalog.alert_rules(catalog.load_rules()):
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"].get(field, "").strip(), f"{rule['alert']} has no {field}"


def test_runbook_urls_name_readme_anchors() -> None:
    catalog = load_catalog()
    for rule in catalog.alert_rules(catalog.load_rules()):
        url = rule["annotations"]["runbook_url"]
        expected = f"README.md#runbook-{rule['alert'].lower()}"
        assert url == expected, f"{rule['alert']}: runbook_url {url!r}, expected {expected!r}"


def test_kubernetes_prometheusrule_is_in_sync() -> None:
    catalog = load_catalog()
    manifest: dict[str, Any] = yaml.safe_load(catalog.K8S_RULE_FILE.read_text())
    assert manifest["spec"]["groups"] == catalog.load_rules()["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from the rule file: "
        "run `python deploy/monitoring/catalog.py sync-k8s`"
    )
    assert catalog.K8S_RULE_FILE.read_text() == catalog.render_k8s_rule(catalog.load_rules())


def test_runbook_links_resolve_in_readme() -> None:
    """The alerts link to README.md anchors: the README carries one `Runbook: <AlertName>`
    section per alert."""
    catalog = load_catalog()
    anchors = doc_anchors(ROOT / "README.md")
    missing = [
        rule["alert"]
        for rule in catalog.alert_rules(catalog.load_rules())
        if f"runbook-{rule['alert'].lower()}" not in anchors
    ]
    assert not missing, f"README.md lacks the headings 'Runbook: <name>' for {missing}"

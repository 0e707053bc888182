"""Static checks of the shipped deployment: dashboards, Prometheus/Alertmanager config, compose,
Kubernetes (schemas of a pinned version) and systemd units."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_deploy_rules import ROOT, load_catalog, run_promtool

DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

pytestmark = pytest.mark.integration


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{dash['uid']}/{panel['title']}/{target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            out.append((f"{dash['uid']}/${var['name']}", inner.group(1) if inner else query))
    return out


def load_dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in DASHBOARDS]


# -- Grafana ------------------------------------------------------------------------------------


def test_dashboards_are_valid_json_with_unique_stable_uids() -> None:
    assert {p.name for p in DASHBOARDS} == {"fleet.json", "subgroups.json", "pipeline.json"}
    dashboards = load_dashboards()
    uids = [d["uid"] for d in dashboards]
    assert len(set(uids)) == len(uids), f"duplicate dashboard uids: {uids}"
    assert all(re.fullmatch(r"[a-z0-9-]{1,40}", u) for u in uids), uids
    assert len({d["title"] for d in dashboards}) == len(dashboards)
    for dash in dashboards:
        ids = [p["id"] for p in dash["panels"]]
        assert len(set(ids)) == len(ids), f"{dash['uid']}: duplicate panel ids"
        for panel in dash["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{dash['uid']}/{panel['title']} overflows"


def test_dashboard_queries_use_only_exported_metrics() -> None:
    catalog = load_catalog()
    known = catalog.known_series_names(catalog.load_metrics()) - {
        "patchd:model_server_requests:rate5m"
    }
    used: set[str] = set()
    for dash in load_dashboards():
        for where, expr in dashboard_queries(dash):
            names = catalog.promql_metric_names(expr)
            assert names, f"{where}: no metric in {expr!r}"
            assert names <= known, f"{where}: not exported by patchd: {sorted(names - known)}"
            used |= names
    # every exported metric is on some dashboard
    missing = {m.name for m in catalog.load_metrics() if not set(m.series_names()) & used}
    assert not missing, f"metrics on no dashboard: {sorted(missing)}"


def test_metric_name_extraction_catches_unknown_names() -> None:
    catalog = load_catalog()
    expr = 'sum by (model) (rate(patchd_typo_total{model=~"$model"}[$__rate_interval])) / up'
    assert catalog.promql_metric_names(expr) == {"patchd_typo_total", "up"}


def test_dashboards_match_their_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "grafana" / "build_dashboards.py"), "--check"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    dashboards = yaml.safe_load((prov / "dashboards" / "patchd.yaml").read_text())
    provider = dashboards["providers"][0]
    assert dashboards["apiVersion"] == 1 and provider["type"] == "file"
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    sources = yaml.safe_load((prov / "datasources" / "patchd.yaml").read_text())["datasources"]
    assert any(s["type"] == "prometheus" and s.get("isDefault") for s in sources)


# -- Prometheus / Alertmanager -------------------------------------------------------------------


def _promtool_checked(tmp_path: Path, name: str) -> dict[str, Any]:
    """deploy/prometheus/``name`` beside the rules, passed by ``promtool check config``."""
    shutil.copy(DEPLOY / "prometheus" / name, tmp_path / "prometheus.yml")
    (tmp_path / "rules").mkdir()
    shutil.copy(DEPLOY / "monitoring" / "rules" / "patchd.rules.yml", tmp_path / "rules")
    result = run_promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(yaml.safe_load((tmp_path / "prometheus.yml").read_text()))


def test_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = _promtool_checked(tmp_path, "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["patchd"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["rules/patchd.rules.yml"]


def test_prometheus_config_checks_from_the_repository() -> None:
    """`promtool check config deploy/prometheus/prometheus.yml` from a checkout: the relative
    rule_files entry must resolve next to the file (deploy/prometheus/rules)."""
    result = run_promtool("check", "config", "deploy/prometheus/prometheus.yml", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout + result.stderr


def test_alertmanager_routes_every_severity_to_a_receiver() -> None:
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    receivers = {r["name"] for r in config["receivers"]}
    routes = config["route"]["routes"]
    assert config["route"]["receiver"] in receivers
    assert all(r["receiver"] in receivers for r in routes)
    severities = {m for r in routes for m in r["matchers"] if m.startswith("severity=")}
    rules = load_catalog().alert_rules(load_catalog().load_rules())
    for rule in rules:
        assert f'severity="{rule["labels"]["severity"]}"' in severities, rule["alert"]


# -- docker compose ------------------------------------------------------------------------------


def _check_health_and_mounts(compose: dict[str, Any]) -> None:
    """Every service has a healthcheck; every mount names a file in deploy/ or a declared volume."""
    for name, service in compose["services"].items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            elif not source.startswith("$"):
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_compose_stack_structure() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    wanted = {"redis", "patchd-serve", "patchd-worker", "prometheus", "grafana", "alertmanager"}
    assert wanted <= set(services), sorted(wanted - set(services))
    _check_health_and_mounts(compose)
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    assert "gpu" in (DEPLOY / "docker-compose.yml").read_text()  # the commented GPU variant


def test_compose_serve_and_worker_share_artifacts_and_wait_for_health() -> None:
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    serve, worker = services["patchd-serve"], services["patchd-worker"]
    assert "patchd-shared:/var/lib/patchd-shared" in serve["volumes"]
    assert "patchd-shared:/var/lib/patchd-shared" in worker["volumes"]
    assert "patchd-state:/var/lib/patchd" not in worker["volumes"]  # serve owns the store
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("patchd-serve", "patchd-worker"):
        dockerfile = DEPLOY.parent / services[name]["build"]["dockerfile"]
        assert dockerfile.exists(), dockerfile
    config = yaml.safe_load((DEPLOY / "compose" / "patchd.yaml").read_text())
    assert str(config["artifacts"]["root"]).startswith("/var/lib/patchd-shared")
    assert config["redis"]["url"].startswith("redis://redis:")


def test_shipped_patchd_configs_are_valid_for_patchd() -> None:
    """The compose and Kubernetes patchd.yaml pass patchd's own config validation."""
    from patchd.config import build_config

    compose = yaml.safe_load((DEPLOY / "compose" / "patchd.yaml").read_text())
    k8s = yaml.safe_load(_by_name("ConfigMap", "patchd-config")["data"]["patchd.yaml"])
    for data in (compose, k8s):
        config = build_config(data, environ={})
        assert config.monitor.n_min == 30 and config.monitor.accuracy_floor == 0.6  # = the rules
        assert config.api.host == "0.0.0.0"


HA = DEPLOY / "docker-compose.ha.yml"


def test_ha_compose_has_two_replicas_postgres_redis_a_bucket_and_workers() -> None:
    compose = yaml.safe_load(HA.read_text())
    services = compose["services"]
    wanted = {
        "postgres", "redis", "minio", "bucket", "patchd-serve-a", "patchd-serve-b",
        "patchd-worker", "prometheus", "alertmanager",
    }  # fmt: skip
    assert wanted <= set(services), sorted(wanted - set(services))
    _check_health_and_mounts(compose)
    replicas = [services["patchd-serve-a"], services["patchd-serve-b"]]
    configs = {
        v for r in replicas for v in r["volumes"] if v.endswith(":/etc/patchd/patchd.yaml:ro")
    }
    assert configs == {"./compose/patchd-ha.yaml:/etc/patchd/patchd.yaml:ro"}  # one config
    states = [next(v for v in r["volumes"] if v.endswith(":/var/lib/patchd")) for r in replicas]
    assert len(set(states)) == 2  # no shared state directory: the store is Postgres
    urls = {r["environment"]["PATCHD_LEADER__ADVERTISE_URL"] for r in replicas}
    assert urls == {"http://patchd-serve-a:8321", "http://patchd-serve-b:8321"}
    for replica in replicas:
        assert set(replica["build"]["args"]["EXTRAS"].split(",")) == {"postgres", "s3"}
        assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert replica["depends_on"]["bucket"]["condition"] == "service_completed_successfully"
    worker = services["patchd-worker"]
    assert "s3" in worker["build"]["args"]["EXTRAS"].split(",")
    assert not any(v.endswith(":/var/lib/patchd") for v in worker["volumes"])  # bucket only
    assert compose["secrets"]["patchd-db-password"]["file"] == "./compose/secrets/db-password"


def test_ha_patchd_config_is_valid_with_two_models_postgres_and_a_bucket() -> None:
    from patchd.config import build_config

    data = yaml.safe_load((DEPLOY / "compose" / "patchd-ha.yaml").read_text())
    # the bucket's keys are read when it is opened, from the variables storage_options names
    # (not PATCHD_*: those are config overrides, which the config refuses as key names)
    config = build_config(data, environ={"S3_ACCESS_KEY_ID": "k", "S3_SECRET_ACCESS_KEY": "s"})
    assert config.store.url == "postgresql://patchd@postgres:5432/patchd"
    assert str(config.store.password_file) == "/run/secrets/patchd-db-password"
    assert config.leader.enabled and config.redis.url.startswith("redis://redis:")
    assert str(config.artifacts.root).startswith("s3://patchd/")
    assert str(config.registry.root).startswith("s3://patchd/")
    assert config.artifacts.storage_options.endpoint_url == "http://minio:9000"
    assert config.model_names == ("digits", "fashion")
    for view in config.per_model():
        assert view.monitor.n_min == 30 and view.monitor.accuracy_floor == 0.6  # = the rules
    assert config.for_model("fashion").patch.trainer == "camel"
    env = (DEPLOY / "compose" / "patchd-ha.env.example").read_text()
    assert {"PATCHD_TOKEN=", "S3_ACCESS_KEY_ID=", "S3_SECRET_ACCESS_KEY="} <= {
        line.split("=", 1)[0] + "=" for line in env.splitlines() if "=" in line
    }


def test_ha_prometheus_scrapes_every_replica(tmp_path: Path) -> None:
    config = _promtool_checked(tmp_path, "prometheus-ha.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "patchd")
    targets = {t for c in job["static_configs"] for t in c["targets"]}
    services = yaml.safe_load(HA.read_text())["services"]
    assert targets == {f"{name}:8321" for name in services if name.startswith("patchd-serve")}


def test_dockerfiles_serve_without_torch_worker_with_extra() -> None:
    serve = (DEPLOY / "docker" / "Dockerfile.serve").read_text()
    worker = (DEPLOY / "docker" / "Dockerfile.worker").read_text()
    assert re.search(r"pip install [^\n]*--prefix=/install \.\s", serve)
    assert "[worker]" not in serve and '".[worker]"' in worker
    assert "USER patchd" in serve and "USER patchd" in worker
    assert "HEALTHCHECK" in serve
    assert 'ARG EXTRAS=""' in serve and 'ARG EXTRAS=""' in worker  # postgres,s3 for the HA stack


def _requirement_closure(dist: str) -> set[str]:
    """Normalised names of every distribution `pip install DIST` (no extras) pulls in."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    stack: list[tuple[str, tuple[str, ...]]] = [(dist, ())]
    while stack:
        name, extras = stack.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requirements:
            req = Requirement(text)
            active = ("", *extras)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in active):
                stack.append((req.name, tuple(req.extras)))
    return seen


def _requirement_closure_with_extras(dist: str, extras: tuple[str, ...]) -> set[str]:
    """As :func:`_requirement_closure`, for ``pip install DIST[extras]`` (the HA serve image)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    out: set[str] = set()
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        if req.marker is not None and any(req.marker.evaluate({"extra": e}) for e in extras):
            out |= _requirement_closure(req.name)
    return out


def test_serve_image_install_pulls_no_heavy_ml_stack() -> None:
    """Dockerfile.serve runs `pip install .`: its dependency closure (from this venv's
    metadata) must hold no torch, torchvision, diffusers, transformers or open_clip."""
    closure = _requirement_closure("patchd")
    closure |= _requirement_closure_with_extras("patchd", ("postgres", "s3"))
    assert "fastapi" in closure and "prometheus-client" in closure  # the walk works
    heavy = {"torch", "torchvision", "diffusers", "transformers", "open-clip-torch"}
    assert not closure & heavy, sorted(closure & heavy)


# -- Kubernetes ---------------------------------------------------------------------------------


def _k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests_validate_against_pinned_schemas() -> None:
    import kubernetes_validate

    docs = _k8s_documents()
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 10


def test_kubernetes_validation_rejects_a_bad_manifest() -> None:
    import kubernetes_validate

    serve = _by_name("Deployment", "patchd-serve")
    broken = copy.deepcopy(serve)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kubernetes_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def _by_name(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in _k8s_documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kubernetes_serve_is_single_writer_with_state_pvc() -> None:
    serve = _by_name("Deployment", "patchd-serve")
    assert serve["spec"]["replicas"] == 1
    assert serve["spec"]["strategy"]["type"] == "Recreate"
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in serve["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"patchd-state", "patchd-shared"}
    assert _by_name("PersistentVolumeClaim", "patchd-shared")["spec"]["accessModes"] == [
        "ReadWriteMany"
    ]
    env = serve["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == "patchd-tokens"


def test_kubernetes_workers_scale_out_and_gpu_variant_targets_gpu_nodes() -> None:
    cpu = _by_name("Deployment", "patchd-worker")
    gpu = _by_name("Deployment", "patchd-worker-gpu")
    assert cpu["spec"]["replicas"] >= 2
    gpu_pod = gpu["spec"]["template"]["spec"]
    assert (
        gpu_pod["nodeSelector"]
        and "nvidia.com/gpu" in gpu_pod["containers"][0]["resources"]["limits"]
    )
    assert "patchd-gpu" in gpu_pod["containers"][0]["args"]
    config = yaml.safe_load(_by_name("ConfigMap", "patchd-config")["data"]["patchd.yaml"])
    assert "patchd-gpu" in config["patch"]["queues"].values()
    redis = _by_name("ConfigMap", "patchd-redis-config")["data"]["redis.conf"]
    assert "appendonly yes" in redis and "maxmemory-policy noeviction" in redis


def test_kubernetes_servicemonitor_selects_the_serve_service() -> None:
    monitor = _by_name("ServiceMonitor", "patchd")
    service = _by_name("Service", "patchd")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    # the job label becomes "patchd", which the rules and dashboards expect
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "patchd"


def test_kubernetes_prometheusrule_structure() -> None:
    rule = _by_name("PrometheusRule", "patchd")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}


# -- systemd -------------------------------------------------------------------------------------

UNITS = ("patchd-serve.service", "patchd-worker@.service")
HARDENING = ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
             "CapabilityBoundingSet=", "RestrictSUIDSGID=yes")  # fmt: skip


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_units_are_hardened(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    sections = re.findall(r"^\[(\w+)\]$", text, re.M)
    assert sections == ["Unit", "Service", "Install"]
    lines = {line.strip() for line in text.splitlines()}
    for option in HARDENING:
        assert option in lines, f"{unit} lacks {option}"
    assert any(line.startswith("ExecStart=") and "/bin/patchd " in line for line in lines)


def test_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify`, with ExecStart pointed at this venv's patchd (it checks the
    binary exists); unknown keys are warnings there, so any output fails the test."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed; the structural test above still runs")
    patchd = Path(sys.executable).with_name("patchd")
    for path in (DEPLOY / "systemd").iterdir():
        text = path.read_text().replace("/opt/patchd/bin/patchd", str(patchd))
        (tmp_path / path.name).write_text(text)
    units = ["./patchd-serve.service", "./patchd-worker@1.service", "./patchd.target"]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output

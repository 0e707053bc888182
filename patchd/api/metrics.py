"""The ``/metrics`` route and ``patchd_build_info{version}``.

Every subsystem registers its own collectors (``patchd.ingest.metrics``, ``patchd.monitor.metrics``,
...) on the one ``services.metrics`` registry; ``/metrics`` exports that registry, never the global
one. The metric names are listed in docs/operating.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


def patchd_version() -> str:
    try:
        return version("patchd")
    except PackageNotFoundError:
        return "0+unknown"


class BuildInfoCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("patchd_build_info", "patchd version", labels=["version"])
        family.add_metric([patchd_version()], 1.0)
        yield family


class ModelLabelCollector(Collector):
    """The collectors of one per-model component kind, exported as one: each metric family once,
    every sample labelled ``model`` (a family that has the label already keeps it)."""

    def __init__(self, by_model: Mapping[str, Sequence[Collector]]) -> None:
        self.by_model = by_model

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for model, collectors in self.by_model.items():
            for collector in collectors:
                for family in collector.collect():
                    out = families.get(family.name)
                    if out is None:
                        out = Metric(family.name, family.documentation, family.type, family.unit)
                        families[family.name] = out
                    for sample in family.samples:
                        if "model" not in sample.labels:
                            sample = sample._replace(labels={"model": model, **sample.labels})
                        out.samples.append(sample)
        yield from families.values()


def metrics_router(registry: CollectorRegistry) -> APIRouter:
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router

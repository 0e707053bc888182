"""Prometheus exposition of serve's own metrics, read from serve's state at scrape time.

Metrics (DESIGN §4.7): ``patchd_predictions_ingested_total{source}``,
``patchd_ingest_rejected_total{source,reason}``, ``patchd_labels_joined_total``,
``patchd_ingest_queue_events``, ``patchd_build_info{version}``. Every component registers its own
collectors on the same ``services.metrics`` registry; ``/metrics`` exports that registry (never
the global one).
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from patchd.ingest import IngestPipeline


def patchd_version() -> str:
    try:
        return version("patchd")
    except PackageNotFoundError:
        return "0+unknown"


class IngestCollector(Collector):
    """Reads the ingest pipeline's counters (committed work only) on every scrape."""

    def __init__(self, pipeline: IngestPipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        ingested, rejected, joined = self.pipeline.stats.snapshot()
        family = CounterMetricFamily(
            "patchd_predictions_ingested", "Prediction events stored", labels=["source"]
        )
        for source, value in sorted(ingested.items()):
            family.add_metric([source], value)
        yield family
        family = CounterMetricFamily(
            "patchd_ingest_rejected",
            "Records rejected (invalid, duplicate, queue full) by reason",
            labels=["source", "reason"],
        )
        for (source, reason), value in sorted(rejected.items()):
            family.add_metric([source, reason], value)
        yield family
        yield CounterMetricFamily(
            "patchd_labels_joined", "Labels joined to their prediction (either order)", value=joined
        )
        yield GaugeMetricFamily(
            "patchd_ingest_queue_events",
            "Events waiting for the writer",
            value=self.pipeline.queued,
        )


class BuildInfoCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("patchd_build_info", "patchd version", labels=["version"])
        family.add_metric([patchd_version()], 1.0)
        yield family


def metrics_router(registry: CollectorRegistry) -> APIRouter:
    router = APIRouter(tags=["metrics"])

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router

"""Ingest metrics, read from the pipeline's committed counters at scrape time.

``patchd_predictions_ingested_total{source}``, ``patchd_ingest_rejected_total{source,reason}``,
``patchd_ingest_inputs_dropped_total{source,reason}`` (tail sources: an unusable input removed,
the prediction kept), ``patchd_labels_joined_total`` and ``patchd_ingest_queue_events``.
A logger CloudEvent the KServe/Seldon adapters refuse before it becomes records (``bad_json``,
``binary_truncated``, ...) counts once in ``patchd_ingest_rejected_total`` (whatever number of
instances it carried) as well as in the adapters' ``patchd_capture_rejected_total``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from patchd.ingest.pipeline import IngestPipeline


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
        family = CounterMetricFamily(
            "patchd_ingest_inputs_dropped",
            "Inputs removed from events (unusable URI); the prediction was kept",
            labels=["source", "reason"],
        )
        for (source, reason), value in sorted(self.pipeline.stats.dropped_inputs().items()):
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

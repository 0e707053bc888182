"""Scrape-time gauges of the candidates component (read from the store, never cached)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from patchd.promotion.record import STATES


class CandidatesCollector(Collector):
    """``patchd_candidates{state}`` and ``patchd_awaiting_approval_seconds``."""

    def __init__(self, state_counts: Callable[[], tuple[dict[str, int], float]]) -> None:
        self.state_counts = state_counts  # (candidates per state, oldest awaiting age in s)

    def collect(self) -> Iterator[Metric]:
        counts, oldest = self.state_counts()
        states = GaugeMetricFamily(
            "patchd_candidates", "Candidates per lifecycle state", labels=["state"]
        )
        for state in STATES:
            states.add_metric([state], float(counts.get(state, 0)))
        yield states
        yield GaugeMetricFamily(
            "patchd_awaiting_approval_seconds",
            "How long the oldest candidate has been awaiting approval (0 when none)",
            value=oldest,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())

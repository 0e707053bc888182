"""Scrape-time gauges of the candidates component (read from the store, never cached)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from patchd.candidates import CandidatesComponent


class CandidatesCollector(Collector):
    """``patchd_candidates{state}`` and ``patchd_awaiting_approval_seconds``."""

    def __init__(self, component: CandidatesComponent) -> None:
        self.component = component

    def collect(self) -> Iterator[Metric]:
        from patchd.candidate_record import STATES

        counts, oldest = self.component.state_counts()
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

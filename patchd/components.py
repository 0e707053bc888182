"""The parts ``patchd serve`` is composed of, in start order (``module:Class`` of a Component)."""

from __future__ import annotations

COMPONENTS: list[str] = [
    "patchd.monitor.component:MonitorComponent",
    "patchd.runs:RunsComponent",
    "patchd.candidates:CandidatesComponent",
    "patchd.plugins.sources.kserve:KServeComponent",
    "patchd.plugins.sources.seldon:SeldonComponent",
]

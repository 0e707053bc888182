"""Candidate reports (JSON + standalone HTML) that a person reads before approving a patch."""

from __future__ import annotations

from patchd.report.candidate import CandidateReport, build_report
from patchd.report.html import render_html

__all__ = ["CandidateReport", "build_report", "render_html"]

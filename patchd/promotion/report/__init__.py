"""Candidate reports (JSON + standalone HTML) that a person reads before approving a patch."""

from __future__ import annotations

from patchd.promotion.report.candidate import CandidateReport, build_report
from patchd.promotion.report.html import render_fragment, render_html

__all__ = ["CandidateReport", "build_report", "render_fragment", "render_html"]

"""Generators of upstream-format capture traffic with exact expected outcomes (replay tests)."""

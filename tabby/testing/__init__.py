"""Helpers that tests of several packages share (tiny seeded models)."""

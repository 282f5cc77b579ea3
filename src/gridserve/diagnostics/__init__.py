"""Diagnostics: the latency doctor."""

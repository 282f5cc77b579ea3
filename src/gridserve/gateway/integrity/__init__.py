"""Checking untrusted work: receipts and settlement, sampled re-execution audits, canaries."""

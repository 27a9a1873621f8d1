"""Observability: usage ledger, access log, metrics."""

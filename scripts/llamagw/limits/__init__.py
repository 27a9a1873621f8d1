"""Limits: token budgets and fair backend queueing."""

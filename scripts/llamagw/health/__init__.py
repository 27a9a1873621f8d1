"""health: the probe server of scripts/health_server.py. Stdlib, config and backend_state only."""

"""The platform's probe server (scripts/health_server.py): stdlib, config and backend_state only."""

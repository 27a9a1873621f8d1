"""pytest hooks and fixtures for every tier: tests under tests/e2e/ are marked e2e here.

The shared helpers (Stack, RawClient, Resp, aio, get/post/chat, eventually, FAST_ENV, the test
keys ...) are plain code in helpers.py: `from helpers import ...`.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    """Every test under tests/e2e/ is in the e2e tier (`make test-e2e`), marked or not."""
    e2e_dir = Path(__file__).parent / "e2e"
    for item in items:
        if e2e_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)

"""The fixed Retry-After values live in errors.py only, and the README's table says what they are.

(What each refusal answers is checked where it happens: test_gateway_identity,
test_gateway_lifecycle, test_gateway_proxy, test_gateway_http.)"""

from __future__ import annotations

import re
from pathlib import Path

from llamagw import errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scripts" / "llamagw"
# The error codes each constant answers.
CODES = {
    "RETRY_AFTER_STARTING": ("backend_starting", "backend_stopping"),
    "RETRY_AFTER_FAILED": ("backend_failed",),
    "RETRY_AFTER_LOADING": ("model_loading",),
    "RETRY_AFTER_CONCURRENCY": ("concurrency_limit_exceeded",),
    "RETRY_AFTER_QUEUE": ("queue_full", "queue_timeout"),
    "RETRY_AFTER_CONNECTIONS": ("too_many_connections",),
    "RETRY_AFTER_USAGE": ("usage_busy", "usage_timeout"),
    "RETRY_AFTER_DASHBOARDS": ("too_many_dashboards",),
}


def readme_table() -> dict[str, int]:
    """code -> seconds, from the README's Retry-After table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("**Retry-After.**", 1)[1].split("\n\n", 2)[1]
    out = {}
    for row in section.splitlines()[2:]:
        seconds, codes, _why = (cell.strip() for cell in row.strip("|").split("|"))
        for code in re.findall(r"`([a-z_]+)`", codes):
            out[code] = int(seconds)
    return out


def test_every_fixed_value_is_named_in_errors_and_listed_in_the_readme():
    named = {name for name in vars(errors) if name.startswith("RETRY_AFTER_")}
    assert named == set(CODES)
    listed = readme_table()
    expected = {code: getattr(errors, name) for name, codes in CODES.items() for code in codes}
    assert listed == expected


def test_no_other_module_writes_a_retry_after_number():
    number = re.compile(r"""retry-after(?:: |["'],\s*["'])\d|RETRY_AFTER\w*\s*=\s*\d""",
                        re.IGNORECASE)
    found = [f"{path.relative_to(PACKAGE)}:{line}"
             for path in PACKAGE.rglob("*.py") if path.name != "errors.py"
             for line in path.read_text().splitlines() if number.search(line)]
    assert found == []

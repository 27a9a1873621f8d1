"""The gateway (its code: llamagw/app.py): config from the environment, wire the parts, serve,
shut down in order.

    python3 scripts/gateway.py        (PORT, BACKEND_HOST, PORT_BACKEND, ... see llamagw/config.py)

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 2 for a configuration error (the message
names the variable), 1 if it cannot listen.
"""

from __future__ import annotations

import sys

from llamagw.app import main


if __name__ == "__main__":
    sys.exit(main())

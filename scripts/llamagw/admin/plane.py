"""The dashboard's side of the gateway in one object: Gateway.admin (app.py).

    guard    admin/guard.AdminGuard: admin keys, sessions, sign-in limits (admission's)
    hub      admin/livehub.LiveHub: the live channel's fan-out (GET /admin/live)
    feed     admin/livefeed.LiveFeed: request / metrics / models events; the models hook
    logs     observe/logbuffer.LogBuffer: the gateway's own log records (start()) and the
             llama-server and boot log files (follow_files()); every new line goes to the hub
    static   admin/static.StaticFiles: /ui/ (read from disk once, here, at start)
    system   admin/system.SystemProbe: GET /admin/system

Life: made with the gateway; start() when it listens (the log handler); follow_files() in the
real process only (a thread that polls the log files); close_streams() first at shutdown (every
live stream ends, so its connection can close), close() last.
"""

from __future__ import annotations

import asyncio
import logging
import re

from llamagw.admin import livefeed, livehub, static
from llamagw.admin.system import SystemProbe
from llamagw.observe import logbuffer

# The gateway's version (GET /admin/system): pyproject.toml's (tests/test_admin_api.py checks).
VERSION = "0.1.0"
# The gateway's own records reach the buffer through the handler (source "gateway"); the boot
# log (entrypoint.sh's stdout and stderr, the gateway's included) repeats them in the gateway's
# logging format (app.setup_logging): those lines are left out of the "boot" source.
GATEWAY_LINE_RE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ gateway(\.[\w.]+)?: ")


class _BootFilter:
    """The LogBuffer a LogFollower writes to, minus the gateway's own lines in the boot log."""

    def __init__(self, buffer: logbuffer.LogBuffer):
        self.buffer = buffer

    def append(self, source: str, level: str, text: str, t: float | None = None):
        if source == "boot" and GATEWAY_LINE_RE.match(text):
            return None
        return self.buffer.append(source, level, text, t)


class AdminPlane:
    def __init__(self, config, services, *, hub: livehub.LiveHub | None = None,
                 static_files: static.StaticFiles | None = None,
                 system: SystemProbe | None = None):
        self.config = config
        self.guard = services.admission.admin
        self.hub = hub or livehub.LiveHub()
        self.feed = livefeed.LiveFeed(self.hub, services)
        self.logs = logbuffer.LogBuffer()
        self.logs.add_listener(self._on_log)
        self.static = static_files or static.StaticFiles.load()
        self.system = system or SystemProbe(config.data_dir, version=VERSION,
                                            started=services.started)
        self._handler: logbuffer.BufferHandler | None = None
        self._logger: logging.Logger | None = None
        self._follower: logbuffer.LogFollower | None = None

    def _on_log(self, entry: dict) -> None:
        # From any thread (the follower's, or the loop's own logging): never re-entered here.
        self.hub.publish_threadsafe("log", entry)

    def start(self, logger: logging.Logger | None = None) -> None:
        """Keep the gateway's own log records (INFO and up) in the buffer."""
        if self._handler is None:
            self._handler = logbuffer.BufferHandler(self.logs)
            self._logger = logger or logging.getLogger("gateway")
            self._logger.addHandler(self._handler)

    def follow_files(self, sources: dict[str, str] | None = None) -> None:
        """Follow the llama-server and boot logs of $DATA_DIR/logs (a thread)."""
        if self._follower is None:
            sources = sources or logbuffer.default_sources(self.config.logs_dir)
            self._follower = logbuffer.LogFollower(_BootFilter(self.logs), sources)
            self._follower.start()

    def close_streams(self) -> None:
        """Shutdown, first: end every live stream and the metrics ticker."""
        self.hub.close_all()
        self.feed.stop()

    async def close(self) -> None:
        self.close_streams()
        if self._handler is not None and self._logger is not None:
            self._logger.removeHandler(self._handler)
            self._handler = None
        if self._follower is not None:
            follower, self._follower = self._follower, None
            await asyncio.to_thread(follower.stop)

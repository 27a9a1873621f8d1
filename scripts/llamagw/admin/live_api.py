"""GET /admin/live: the dashboard's one live channel (Server-Sent Events, ADMIN-API.md).

The stream starts with `hello` {"key_id", "server_time", "history"}, the `models` snapshot and a
first `metrics`, then carries live events (admin/livefeed.py: request, metrics, models; the log
buffer: log) and `dropped` {"count"} when this dashboard fell behind its bounded queue
(admin/livehub.py), and a `: heartbeat` comment in every silence of HEARTBEAT_S. At most
livehub.MAX_SUBSCRIBERS streams at once: 503 `too_many_dashboards` beyond. The subscription is
released on every exit (client gone, write timeout, shutdown: Gateway.shutdown ends every live
stream first), also when the stream is never started (HEAD).
"""

from __future__ import annotations

from llamagw.admin import livehub
from llamagw.context import Call, StreamResponse
from llamagw.errors import RETRY_AFTER_DASHBOARDS, GatewayError

SSE = [("content-type", "text/event-stream; charset=utf-8")]
# The heartbeat comes every HEARTBEAT_S: twice that with nothing to send is a stream to cut.
IDLE_TIMEOUT_S = 2 * livehub.HEARTBEAT_S


class _Frames:
    """The subscriber's frames as the pipeline's chunk iterator; aclose() frees the
    subscription whether or not iteration ever started."""

    def __init__(self, sub: livehub.Subscriber):
        self.sub = sub
        self._it = sub.frames()

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        return await self._it.__anext__()

    async def aclose(self) -> None:
        self.sub.close()
        await self._it.aclose()


async def live(call: Call) -> StreamResponse:
    admin = call.services.admin
    feed = admin.feed
    if call.req.method == "HEAD":           # the head only: no subscription to hold
        return StreamResponse(200, list(SSE), _empty())
    try:
        sub = admin.hub.subscribe(initial=[
            ("hello", {"key_id": call.ctx.key_id, "server_time": round(feed.wall(), 3),
                       "history": feed.history_for_hello()}),
            ("models", feed.first_models()),
            ("metrics", feed.metrics(opening=1)),
        ])
    except livehub.HubFull:
        raise GatewayError(503, f"{admin.hub.max_subscribers} dashboards are open already; "
                                "close one and retry", "too_many_dashboards",
                           headers=[("retry-after", str(RETRY_AFTER_DASHBOARDS))]) from None
    feed.ensure_ticker()
    return StreamResponse(200, list(SSE), _Frames(sub), idle_timeout=IDLE_TIMEOUT_S)


async def _empty():
    return
    yield b""       # an async generator with nothing in it

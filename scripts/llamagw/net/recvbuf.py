"""One receive buffer per event-loop thread, shared by every connection's protocol.

asyncio's plain Protocol path allocates a fresh 256 KiB bytes object for every recv() and then
shrinks it to what arrived. glibc serves a block that large with mmap (its mmap threshold starts
at 128 KiB) or from the top of the heap, which it trims again once more than its trim threshold
is free, so reads fault fresh pages in, most of all in a fresh process. Measured on the
benchmark's 2-CPU VM: a recv of 300 bytes on a socketpair costs 15 us and 2 page faults that way
against 2.5 us for recv_into a kept buffer plus the copy; a fresh gateway relaying 1,000 streams
of 40 events took 67,000 minor faults and 1.1 s of system CPU (0.6 s with this buffer), and the
streams' time to first byte p99 was 340-400 ms against about 210 ms with it.

fastio.SocketTransport reads into this thread's buffer (recv_into) and hands the protocol's
data_received a bytes copy of exactly what arrived, before the next read reuses the buffer. A
buffer per thread, not per process: tests run event loops in several threads at once.
"""

from __future__ import annotations

import threading

# Bytes one read may take: asyncio's own read size for socket transports, so a large answer
# arrives in as few reads as before.
RECV_BUFFER_BYTES = 256 * 1024

_local = threading.local()


def thread_buffer() -> memoryview:
    """This thread's receive buffer (made on first use, kept for the thread's life)."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(RECV_BUFFER_BYTES))
    return view

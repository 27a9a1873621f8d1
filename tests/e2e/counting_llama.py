"""A real llama-server behind a connection-counting TCP relay, for e2e tests.

Used as LLAMA_SERVER_BIN: `counting_llama.py <llama-server args>`. It waits LOAD_DELAY seconds
(a stand-in for loading a big model, so the test can see health 204), starts the real llama-server
(REAL_LLAMA_SERVER) on a private port, and relays the address it was given (`--port`, or a Unix
socket `--host *.sock` as entrypoint.sh passes by default) to it, appending one line to COUNT_FILE
per accepted connection. A test reads that file to prove who talks to
llama-server. SIGTERM is passed on; the relay exits with llama-server.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        inner = s.getsockname()[1]
    host_at = args.index("--host") + 1
    unix_path = args[host_at] if args[host_at].endswith(".sock") else ""
    if unix_path:
        args[host_at:host_at + 1] = ["127.0.0.1", "--port", str(inner)]
        port = 0
    else:
        port = int(args[args.index("--port") + 1])
        args[args.index("--port") + 1] = str(inner)
    time.sleep(float(os.environ.get("LOAD_DELAY", "0")))
    child = subprocess.Popen([os.environ["REAL_LLAMA_SERVER"], *args])
    count_file = os.environ["COUNT_FILE"]

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        with open(count_file, "a") as f:
            f.write("conn\n")
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", inner)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    async def run():
        loop = asyncio.get_running_loop()
        if unix_path:
            server = await asyncio.start_unix_server(handle, unix_path)
        else:
            server = await asyncio.start_server(handle, "127.0.0.1", port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set() and child.poll() is None:
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
        server.close()
        if child.poll() is None:
            child.terminate()
        return child.wait(10)

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())

"""wire: HTTP/1.1 and SSE, sans-IO. Imports stdlib and errors only, never asyncio or socket."""

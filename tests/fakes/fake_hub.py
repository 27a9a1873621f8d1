"""A Hugging Face hub and its CDN on loopback, for the model downloader's tests.

Two HTTP servers on 127.0.0.1, so two origins (a token must never reach the CDN):

  hub  GET /api/models/OWNER/REPO[?blobs=true]  {"id", "siblings": [{"rfilename"[, "size",
                                                 "lfs": {"sha256", "size"}]}]} (sizes with blobs)
       GET /OWNER/REPO/resolve/main/PATH        302 to the CDN (X-Linked-Size, X-Linked-Etag), or
                                                 with `cache_hop`, first a 307 to
                                                 /OWNER/REPO/resolve-cache/main/PATH on the hub
       GET anything in `routes`                 {path: (content type, body)}
       401 for everything but `routes` when `token` is set and the request lacks
       "Authorization: Bearer <token>"; 404 for unknown repositories and files
  cdn  GET /cdn/SHA256?X-Amz-Signature=...       the blob, Range "bytes=A-" / "bytes=A-B" (206),
                                                 416 from the end on
       GET /files/NAME                           a plain file (`files`), same Range support

Faults: `faults` is a list consumed one per CDN file request: "cut" (the whole length announced,
half of it sent, then the connection closed), "500", "503" (with Retry-After: 0), "416" (whatever
the range), "wrong" (the right length, wrong bytes), "norange" (200 with the whole file, Range
ignored). `rate`: bytes per second per CDN body (None: full speed).

Recording: `requests` [(server, method, path, headers dict)]; `cdn_bytes` bytes of file bodies
sent; `cdn_gets` file requests answered by the CDN.

Standard library only; never imports from scripts/.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
import urllib.parse

SIGNATURE = "X-Amz-Signature=s3cr3t-signature-0123456789"
CHUNK = 64 << 10


class FakeHub:
    def __init__(self, *, token: str | None = None):
        self.token = token
        self.repos: dict[str, dict[str, bytes]] = {}
        self.files: dict[str, bytes] = {}
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.faults: list[str] = []
        self.rate: float | None = None
        self.cache_hop = False
        self.requests: list[tuple[str, str, str, dict]] = []
        self.cdn_bytes = 0
        self.cdn_gets = 0
        self._lock = threading.Lock()
        self._servers: list[http.server.ThreadingHTTPServer] = []

    # ---- setup
    def add(self, repo: str, path: str, data: bytes) -> str:
        """Put a file into a repository ("owner/name"); its sha256."""
        self.repos.setdefault(repo, {})[path] = data
        return hashlib.sha256(data).hexdigest()

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, role))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                             daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def record(self, role: str, method: str, path: str, headers) -> None:
        with self._lock:
            self.requests.append((role, method, path, {k.lower(): v for k, v in headers.items()}))

    def blob(self, sha: str) -> bytes | None:
        for files in self.repos.values():
            for data in files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data
        return None

    def next_fault(self) -> str:
        with self._lock:
            return self.faults.pop(0) if self.faults else ""


def _handler(hub: FakeHub, role: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hub.record(role, "GET", self.path, self.headers)
            u = urllib.parse.urlsplit(self.path)
            if role == "hub":
                self.hub_get(u)
            else:
                self.cdn_get(u)

        def answer(self, status: int, body: bytes = b"", ctype: str = "application/json",
                   headers: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def error(self, status: int, message: str) -> None:
            self.answer(status, json.dumps({"error": message}).encode())

        # ---- hub
        def hub_get(self, u) -> None:
            if u.path in hub.routes:
                ctype, body = hub.routes[u.path]
                return self.answer(200, body, ctype)
            if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self.error(401, "Invalid credentials in Authorization header")
            parts = u.path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) == 4:
                return self.model_api(f"{parts[2]}/{parts[3]}", "blobs=true" in u.query)
            if len(parts) >= 5 and parts[2] in ("resolve", "resolve-cache") and \
                    parts[3] == "main":
                repo = f"{parts[0]}/{parts[1]}"
                path = urllib.parse.unquote("/".join(parts[4:]))
                data = hub.repos.get(repo, {}).get(path)
                if data is None:
                    return self.error(404, "Entry not found")
                if hub.cache_hop and parts[2] == "resolve":
                    return self.answer(307, b"", headers={
                        "Location": f"/{repo}/resolve-cache/main/{'/'.join(parts[4:])}"})
                sha = hashlib.sha256(data).hexdigest()
                return self.answer(302, b"", headers={
                    "Location": f"{hub.cdn}/cdn/{sha}?{SIGNATURE}",
                    "X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{sha}"'})
            self.error(404, "Not found")

        def model_api(self, repo: str, blobs: bool) -> None:
            files = hub.repos.get(repo)
            if files is None:
                return self.error(404, "Repository not found")
            siblings = []
            for path, data in files.items():
                entry = {"rfilename": path}
                if blobs:
                    sha = hashlib.sha256(data).hexdigest()
                    entry.update(size=len(data), blobId="0" * 40,
                                 lfs={"sha256": sha, "size": len(data), "pointerSize": 134})
                siblings.append(entry)
            siblings.append({"rfilename": "README.md", **({"size": 10} if blobs else {})})
            self.answer(200, json.dumps({"id": repo, "modelId": repo,
                                         "siblings": siblings}).encode())

        # ---- CDN
        def cdn_get(self, u) -> None:
            if u.path.startswith("/cdn/"):
                data = hub.blob(u.path[len("/cdn/"):])
            elif u.path.startswith("/files/"):
                data = hub.files.get(urllib.parse.unquote(u.path[len("/files/"):]))
            else:
                data = None
            if data is None:
                return self.error(404, "NoSuchKey")
            with hub._lock:
                hub.cdn_gets += 1
            fault = hub.next_fault()
            if fault == "500":
                return self.error(500, "server error")
            if fault == "503":
                return self.answer(503, b"{}", headers={"Retry-After": "0"})
            size, etag = len(data), hashlib.sha256(data).hexdigest()[:16]
            first, status = 0, 200
            rng = self.headers.get("Range", "")
            if fault == "416":
                return self.answer(416, b"", headers={"Content-Range": f"bytes */{size}"})
            if rng.startswith("bytes=") and fault != "norange":
                a, _, b = rng[6:].partition("-")
                first = int(a)
                last = int(b) if b else size - 1
                if first >= size:
                    return self.answer(416, b"", headers={"Content-Range": f"bytes */{size}"})
                data = data[first:last + 1]
                status = 206
            if fault == "wrong":
                data = bytes(x ^ 0xFF for x in data)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range",
                                 f"bytes {first}-{first + len(data) - 1}/{size}")
            self.end_headers()
            body = data[:len(data) // 2] if fault == "cut" else data
            self.send_body(body)
            if fault == "cut":
                self.close_connection = True
                self.wfile.flush()

        def send_body(self, body: bytes) -> None:
            t0 = time.monotonic()
            for i in range(0, len(body), CHUNK):
                piece = body[i:i + CHUNK]
                try:
                    self.wfile.write(piece)
                except OSError:
                    return
                with hub._lock:
                    hub.cdn_bytes += len(piece)
                if hub.rate:
                    wait = t0 + (i + len(piece)) / hub.rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)

    return Handler

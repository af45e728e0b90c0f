"""A real HTTP server on loopback for the builder's online side: package indexes, conda
channels and a model hub, all served from files the tests made.

``LocalServer(root)`` serves the files under ``root`` (GET and HEAD, with single-range
``Range`` requests, so resumed downloads are real), plus any routes a test adds with
:meth:`LocalServer.route`. Faults are injected per path with :meth:`LocalServer.fail`:
an HTTP status a number of times, a connection cut after some bytes, bytes served flipped, or
a body of unannounced length (no ``Content-Length``; it ends when the connection closes).
Every request is logged in :attr:`LocalServer.requests` as ``(method, path, range header)``.

Use it as a context manager, or through the ``local_server`` fixture in conftest.py.
"""

from __future__ import annotations

import mimetypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# A route gets the request path (query included) and headers and returns
# (status, headers, body) or None to fall through to the file tree.
Route = Callable[[str, dict[str, str]], "tuple[int, dict[str, str], bytes] | None"]


@dataclass
class Fault:
    status: int | None = None  # answer this status instead of the file
    cut_after: int | None = None  # send this many body bytes, then drop the connection
    corrupt: bool = False  # flip one byte of the body
    no_length: bool = False  # no Content-Length: the body ends when the connection closes
    times: int = 1  # how many requests it applies to (-1: all)


class LocalServer:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.routes: list[tuple[str, Route]] = []
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> LocalServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def route(self, prefix: str, handler: Route) -> None:
        """Answer requests whose path starts with ``prefix`` with ``handler`` first."""
        self.routes.append((prefix, handler))

    def fail(self, path: str, fault: Fault) -> None:
        self.faults[path] = fault

    def count(self, path: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            fault = self.faults.get(path)
            if fault is None or fault.times == 0:
                return None
            if fault.times > 0:
                fault.times -= 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:  # quiet test output
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, *, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                with server._lock:
                    server.requests.append((self.command, path, self.headers.get("Range")))
                fault = server._take_fault(path)
                if fault is not None and fault.status is not None:
                    self._send(fault.status, {}, b"injected failure\n", body=body)
                    return
                for prefix, route in server.routes:
                    if self.path.startswith(prefix):
                        answer = route(self.path, dict(self.headers.items()))
                        if answer is not None:
                            status, headers, data = answer
                            self._send(status, headers, data, body=body, fault=fault)
                            return
                target = (server.root / path.lstrip("/")).resolve()
                if target.is_dir():  # a PEP 503 project page is a directory's index.html
                    target = target / "index.html"
                if not target.is_relative_to(server.root.resolve()) or not target.is_file():
                    self._send(404, {}, b"not found\n", body=body)
                    return
                data = target.read_bytes()
                ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
                self._send(200, {"Content-Type": ctype}, data, body=body, fault=fault)

            def _send(
                self,
                status: int,
                headers: dict[str, str],
                data: bytes,
                *,
                body: bool,
                fault: Fault | None = None,
            ) -> None:
                start = 0
                if status == 200 and (spec := self.headers.get("Range")):
                    first = spec.removeprefix("bytes=").split("-", 1)[0]
                    if first.isdigit() and int(first) < len(data):
                        start = int(first)
                        status = 206
                        headers = headers | {
                            "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"
                        }
                    elif first.isdigit():
                        status, data, start = 416, b"", 0
                        headers = {"Content-Range": f"bytes */{len(data)}"}
                payload = data[start:]
                if fault is not None and fault.corrupt and payload:
                    payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Accept-Ranges", "bytes")
                if fault is not None and fault.no_length:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if not body:
                    return
                if fault is not None and fault.cut_after is not None:
                    self.wfile.write(payload[: fault.cut_after])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(payload)

        return Handler

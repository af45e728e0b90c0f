"""ASGI middleware: the request record (log + metrics) around everything, then the API key,
then the body limit.

Pure ASGI rather than ``BaseHTTPMiddleware``: the record must see the end of a streamed
response (its token counts are only known then), and nothing here may buffer a response.

The key is checked before a byte of the body is read: a caller without a valid key costs one
header lookup, never a 4 MiB buffer or a JSON parse (FastAPI parses a route's body before it
runs the route's dependencies, so a dependency alone would come too late).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.server.auth import KeyChecker
from appliance.server.engine import Engine
from appliance.server.errors import APIError, AuthenticationError, BodyTooLargeError, error_payload
from appliance.server.record import STATE_KEY, RequestRecord
from appliance.server.requestlog import RequestLog

log = logging.getLogger(__name__)

UNLOGGED_PATHS = frozenset({"/healthz"})  # probes every few seconds would drown the log
# Past the limit, read on (discarding) up to this much, so the client finishes sending and
# reads our 413 instead of failing with a reset connection; beyond it, just answer and close.
_DRAIN_LIMIT = 16 * 1024 * 1024


class RecordMiddleware:
    def __init__(self, app: ASGIApp, *, engine: Engine, request_log: RequestLog) -> None:
        self.app = app
        self.engine = engine
        self.request_log = request_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(method=scope["method"], path=scope["path"])
        scope.setdefault("state", {})[STATE_KEY] = record
        finished = False

        def finish() -> None:
            nonlocal finished
            if not finished:
                finished = True
                record.route = getattr(scope.get("route"), "path", None)
                self._finish(record)

        async def send_and_note(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Account before the last byte goes out: a client that has its answer
                # finds it in the log and the metrics already.
                finish()
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            if record.status is None:  # the client left before any answer
                record.status = 499
            finish()

    def _finish(self, record: RequestRecord) -> None:
        try:
            self.engine.metrics.observe_request(record)
            if record.path not in UNLOGGED_PATHS:
                self.request_log.write(record.to_log(time.monotonic()))
        except OSError:
            log.exception("cannot write the request log")


class KeyMiddleware:
    """401 for a request without a valid API key, unless ``is_public(path)``; the key's name
    goes into the request record (:func:`appliance.server.deps.require_key` reads it there).

    The body of a refused request is left unread: uvicorn discards it as it arrives, and the
    connection limits (:mod:`appliance.server.connections`) close a client that goes on sending.
    """

    def __init__(self, app: ASGIApp, *, keys: KeyChecker, is_public: Callable[[str], bool]) -> None:
        self.app = app
        self.keys = keys
        self.is_public = is_public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            name = self.keys.check(_bearer_token(scope))
        except AuthenticationError as error:
            await _answer(scope, receive, send, error, close=False)
            return
        RequestRecord.of_scope(scope).key_name = name
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Read the whole body up front, at most ``max_body_bytes`` of it; more: 413."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = _content_length(scope)
        body = bytearray()
        too_large = declared is not None and declared > limit
        seen = 0
        more = True
        while more and not (too_large and seen > limit + _DRAIN_LIMIT):
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            more = message.get("more_body", False)
            if seen > limit:
                too_large = True
                body.clear()
            elif not too_large:
                body += chunk
        if too_large:
            error = BodyTooLargeError(f"request body is larger than {limit} bytes")
            await _answer(scope, receive, send, error, close=True)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: only http.disconnect will come

        await self.app(scope, replay, send)


async def _answer(
    scope: Scope, receive: Receive, send: Send, error: APIError, *, close: bool
) -> None:
    RequestRecord.of_scope(scope).error = error.code
    response = JSONResponse(
        error_payload(scope["path"], error), status_code=error.status, headers=error.headers()
    )
    if close:
        response.headers["Connection"] = "close"
    await response(scope, receive, send)


def _bearer_token(scope: Scope) -> str | None:
    """The credentials of ``Authorization: Bearer <credentials>``, read as FastAPI's
    ``HTTPBearer`` reads them; None for no header, another scheme or no credentials."""
    header = Headers(scope=scope).get("authorization")
    scheme, credentials = get_authorization_scheme_param(header)
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

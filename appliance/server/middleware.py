"""ASGI middleware: the request record (log + metrics) around everything, then the API key
(with its endpoint scope and rate limits), then the body limit, then the key's model scope.

Pure ASGI rather than ``BaseHTTPMiddleware``: the record must see the end of a streamed
response (its token counts are only known then), and nothing here may buffer a response.

The key is checked before a byte of the body is read: a caller without a valid key costs one
header lookup, never a 4 MiB buffer or a JSON parse (FastAPI parses a route's body before it
runs the route's dependencies, so a dependency alone would come too late).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from appliance.apikeys import ApiKey
from appliance.server.auth import KeyChecker, check_endpoint, check_model
from appliance.server.engine import Engine
from appliance.server.errors import APIError, BodyTooLargeError, error_payload
from appliance.server.ratelimit import KeyLimiter
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
            self.engine.observe_canary(record)
            if record.path not in UNLOGGED_PATHS:
                self.request_log.write(record.to_log(time.monotonic()))
        except OSError:
            log.exception("cannot write the request log")


class KeyMiddleware:
    """401 for a request without a valid API key, unless ``is_public(path)``; 403 for a path
    outside the key's scopes; 429 past its requests per minute or tokens per day. The key's
    name goes into the request record (:func:`appliance.server.deps.require_key` reads it
    there), and the tokens of the request, once it has ended, into the key's daily count.

    The body of a refused request is left unread: uvicorn discards it as it arrives, and the
    connection limits (:mod:`appliance.server.connections`) close a client that goes on sending.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: KeyChecker,
        is_public: Callable[[str], bool],
        limiter: KeyLimiter,
    ) -> None:
        self.app = app
        self.keys = keys
        self.is_public = is_public
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        record = RequestRecord.of_scope(scope)
        try:
            key = self.keys.authenticate(_bearer_token(scope))
            record.key_name = key.name
            check_endpoint(key, scope["path"])
            self.limiter.admit(key.name, key.limits)
        except APIError as error:
            await _answer(scope, receive, send, error, close=False)
            return
        scope["state"][_KEY_STATE] = key
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.charge(key.name, record.prompt_tokens + record.completion_tokens)


class ModelScopeMiddleware:
    """403 for a request that names a model its key may not use. Only keys with a model scope
    pay for it (a second parse of the body, which the body limit has read and bounded)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = scope.get("state", {}).get(_KEY_STATE) if scope["type"] == "http" else None
        if not isinstance(key, ApiKey) or not key.limits.models:
            await self.app(scope, receive, send)
            return
        first = await receive()
        model = _requested_model(scope, first.get("body", b""))
        if model is not None:
            try:
                check_model(key, model)
            except APIError as error:
                await _answer(scope, receive, send, error, close=False)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)


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


_KEY_STATE = "api_key"  # the caller's ApiKey, in the ASGI scope's state
_MODEL_PATH = "/v1/models/"
_NAMED_BY_NAME = "/api/show"  # Ollama's show takes "name" as well as "model"


def _requested_model(scope: Scope, body: bytes) -> str | None:
    """The model a request names: in the path of ``GET /v1/models/{id}``, else the body's
    ``model`` (or ``name`` for Ollama's show); None if it names none (the route answers 400)."""
    path: str = scope["path"]
    if path.startswith(_MODEL_PATH):
        return path[len(_MODEL_PATH) :]
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep: the route says so
        return None
    if not isinstance(doc, dict):
        return None
    model = doc.get("model")
    if model is None and path == _NAMED_BY_NAME:
        model = doc.get("name")
    return model if isinstance(model, str) else None


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

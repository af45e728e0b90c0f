"""Errors of the REST API, in the OpenAI error shape.

Every error response is ``{"error": {"message", "type", "param", "code"}}``, whatever raised it:
an :class:`APIError` raised by our code, a request that fails validation, a route that does not
exist, or an :class:`~signing.errors.AirgapError` from a backend. :func:`install_handlers`
registers one handler per error type; each also tells the request record what went wrong, for
the request log and the ``errors`` metric.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.runtime.base import ContextLengthError
from appliance.server.record import RequestRecord
from signing.errors import AirgapError, InputError, StateError

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class APIError(AirgapError):
    """An error answered to the client; subclasses fix status, type and code."""

    status: ClassVar[int] = 400
    type: ClassVar[str] = INVALID_REQUEST
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> Mapping[str, str] | None:
        return None


class BadRequestError(APIError):
    pass


class InvalidJSONError(APIError):
    code = "invalid_json"


class UnsupportedParameterError(APIError):
    code = "unsupported_parameter"


class ContextLengthExceededError(APIError):
    code = "context_length_exceeded"


class AuthenticationError(APIError):
    status = 401
    code = "invalid_api_key"

    def headers(self) -> Mapping[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelNotFoundError(APIError):
    status = 404
    code = "model_not_found"


class RouteNotFoundError(APIError):
    status = 404
    code = "not_found"


class MethodNotAllowedError(APIError):
    status = 405
    code = "method_not_allowed"


class BodyTooLargeError(APIError):
    status = 413
    code = "request_too_large"


class ClientClosedError(APIError):
    """Nobody reads this answer; 499 as in nginx, for the request log and the metrics."""

    status = 499
    code = "client_closed_request"


class QueueFullError(APIError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> Mapping[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NotReadyError(APIError):
    status = 503
    type = "server_error"
    code = "model_not_loaded"


class RequestTimeoutError(APIError):
    status = 504
    type = "timeout_error"
    code = "request_timeout"


class InternalError(APIError):
    status = 500
    type = "server_error"
    code = "internal_error"


def error_body(
    message: str, *, type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error_body(exc: APIError) -> dict[str, Any]:
    return error_body(exc.message, type_=exc.type, code=exc.code, param=exc.param)


OLLAMA_PREFIX: Final = "/api/"


def error_payload(path: str, exc: APIError) -> dict[str, Any]:
    """The error body for a request to ``path``: OpenAI's shape, or Ollama's
    (``{"error": "message"}``, what Ollama's clients read) under ``/api/``."""
    if path.startswith(OLLAMA_PREFIX):
        return {"error": exc.message}
    return api_error_body(exc)


def error_response(request: Request, exc: APIError) -> JSONResponse:
    RequestRecord.of(request).error = exc.code or exc.type
    return JSONResponse(
        error_payload(request.url.path, exc), status_code=exc.status, headers=exc.headers()
    )


def as_api_error(exc: AirgapError) -> APIError:
    """Our own errors from below the HTTP layer (backend, key store), as API errors."""
    if isinstance(exc, APIError):
        return exc
    message = exc.diagnostics()
    if isinstance(exc, ContextLengthError):
        return ContextLengthExceededError(message)
    if isinstance(exc, InputError):
        return BadRequestError(message)
    if isinstance(exc, StateError):
        return NotReadyError(message)
    # ModelError and the rest: details (paths, native errors) are for the operator's log.
    log.error("request failed: %s", message)
    return InternalError("the model failed on this request; the server log says why")


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(AirgapError)
    async def on_airgap_error(request: Request, exc: AirgapError) -> JSONResponse:
        return error_response(request, as_api_error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(request, RouteNotFoundError(f"no route {request.url.path}"))
        if exc.status_code == 405:
            return error_response(
                request, MethodNotAllowedError(f"{request.method} is not allowed here")
            )
        response = error_response(request, BadRequestError(str(exc.detail)))
        response.status_code = exc.status_code
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        return error_response(request, InternalError("internal server error"))


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, as OpenAI reports it: 400, ``param`` naming the field."""
    errors = exc.errors()
    if not errors:
        return BadRequestError("invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return InvalidJSONError(f"request body is not valid JSON: {detail}".rstrip(": "))
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = _param_name(loc)
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "missing":
        return BadRequestError(f"missing required parameter: {param}", param=param)
    if not loc:
        return BadRequestError(f"request body: {message}")
    return BadRequestError(f"invalid value for {param}: {message}", param=param)


def _param_name(loc: list[str]) -> str:
    """``['messages', '0', 'content']`` -> ``messages[0].content``."""
    name = ""
    for part in loc:
        if part.isdigit():
            name += f"[{part}]"
        elif part.isidentifier() and part not in _UNION_TAGS:
            name += f".{part}" if name else part
        # else: pydantic's name of a union member ("list[str]", "function-after[...]"),
        # which says nothing to a client
    return name


_UNION_TAGS: Final = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})

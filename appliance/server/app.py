"""``create_app``: the FastAPI application of ``appliance serve``.

Nothing is created at import time: each call builds its own engine (queue, worker pool,
metrics registry), key checker and request log, kept on ``app.state.appliance`` and reached by
routes through typed dependencies (:mod:`appliance.server.deps`). Worker threads and the log
file are opened by the app's lifespan, so an app that is built but never served holds nothing.

Every route needs an API key except ``GET /healthz``; ``/docs`` and ``/openapi.json`` too,
unless ``public_docs`` is set (docs/adr/0006-rest-server.md). The key is checked by middleware,
before the body is read (docs/adr/0009-server-limits.md).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING

from fastapi import FastAPI

from appliance.canary import ACTIVE, CANARY
from appliance.server.auth import KeyChecker
from appliance.server.deps import AppState
from appliance.server.engine import Engine
from appliance.server.errors import install_handlers
from appliance.server.holder import ModelHolder
from appliance.server.masking import MaskingPolicy, build_masker
from appliance.server.middleware import (
    BodyLimitMiddleware,
    KeyMiddleware,
    ModelScopeMiddleware,
    RecordMiddleware,
)
from appliance.server.ratelimit import TOKEN_WINDOW_S, KeyLimiter
from appliance.server.requestlog import RequestLog, parse_sinks
from appliance.server.routers import (
    chat,
    completions,
    docs,
    embeddings,
    health,
    metrics,
    models,
    ollama,
)
from appliance.server.settings import ServerSettings
from signing.errors import InputError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from appliance.server.canary import CanaryRoute


def create_app(
    settings: ServerSettings, holder: ModelHolder, *, canary: CanaryRoute | None = None
) -> FastAPI:
    """An app serving whatever backend ``holder`` holds at the time of each request (and
    ``canary``'s to the keys it answers: appliance.server.canary).

    ``settings`` must name the key file and the request log (see
    :meth:`ServerSettings.resolved`): the server never guesses where its secrets are.
    """
    if settings.api_key_file is None or settings.request_log is None:
        raise InputError("server settings: api_key_file and request_log must be set")
    engine = Engine(
        holder,
        max_concurrency=settings.concurrency,
        max_queue=settings.max_queue,
        request_timeout_s=settings.request_timeout_s,
        canary=canary,
    )
    engine.metrics.follow(
        lambda: {ACTIVE: holder.get(), CANARY: canary.holder.get() if canary else None},
        capacity=settings.concurrency,
    )
    request_log = RequestLog(
        settings.request_log,
        sinks=parse_sinks(settings.request_log_sinks),
        max_bytes=settings.request_log_max_bytes,
        syslog_address=settings.syslog_socket,
    )
    request_log.preflight()  # a tampered log: one line now, not a failed lifespan later
    keys = KeyChecker(settings.api_key_file)
    masking = MaskingPolicy(settings.masking, settings.masking_keys)
    state = AppState(
        settings=settings,
        engine=engine,
        keys=keys,
        request_log=request_log,
        masking=masking,
        masker=build_masker(masking, log_prompts=settings.log_prompts),
    )

    def is_public(path: str) -> bool:
        return path in health.PUBLIC_PATHS or (settings.public_docs and docs.is_docs_path(path))

    limiter = KeyLimiter()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        request_log.open()
        # A restart does not give every key a new day's tokens: the log has what they used.
        keys_charged = limiter.restore(request_log.recent_usage(TOKEN_WINDOW_S))
        if keys_charged:
            log.info(
                "tokens per day: the request log's last 24 h charged to %d key(s)", keys_charged
            )
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            request_log.close()

    app = FastAPI(
        title="airgap-appliance",
        summary="OpenAI-compatible API of the model in the active slot.",
        version=version("airgap-appliance"),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by routers.docs, behind the key
        lifespan=lifespan,
    )
    app.state.appliance = state
    install_handlers(app)
    for module in (chat, completions, embeddings, ollama, models, health, metrics, docs):
        app.include_router(module.router)
    # Added last = outermost: the record sees every answer, the 401s and 413s included; the key
    # comes before the body limit, so that no body is read for a caller without a key.
    # The key's model scope needs the body, so it comes inside the body limit.
    app.add_middleware(ModelScopeMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(KeyMiddleware, keys=keys, is_public=is_public, limiter=limiter)
    app.add_middleware(RecordMiddleware, engine=engine, request_log=request_log)
    return app

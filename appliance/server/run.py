"""Serving the app with uvicorn: ``run_server`` for ``appliance serve``; ``build_server``."""

from __future__ import annotations

import socket

import uvicorn

from appliance.server.app import create_app
from appliance.server.holder import ModelHolder
from appliance.server.settings import ServerSettings


def build_server(
    settings: ServerSettings, holder: ModelHolder, *, log_level: str = "info"
) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings, holder),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,  # the request log records every request, with its key and tokens
        server_header=False,
        proxy_headers=False,  # no proxy is trusted to tell us who the client is
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


def run_server(settings: ServerSettings, holder: ModelHolder) -> None:
    """Serve until SIGINT/SIGTERM; then finish the requests in flight (up to 10 s) and stop."""
    build_server(settings, holder).run()


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with ``port=0``)."""
    for srv in server.servers:
        for sock in srv.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                port: int = sock.getsockname()[1]
                return port
    raise RuntimeError("the server is not listening")

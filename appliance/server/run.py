"""Serving the app with uvicorn: ``run_server`` for ``appliance serve``; ``build_server``."""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import uvicorn

from appliance.server.app import create_app
from appliance.server.connections import ConnectionGuard, connection_limits, guarded_protocol
from appliance.server.holder import ModelHolder
from appliance.server.settings import ServerSettings
from appliance.server.tls import server_context

if TYPE_CHECKING:
    from appliance.server.canary import CanaryRoute

log = logging.getLogger(__name__)

_STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def build_server(
    settings: ServerSettings,
    holder: ModelHolder,
    *,
    log_level: str = "info",
    canary: CanaryRoute | None = None,
) -> uvicorn.Server:
    tls = server_context(settings.tls_cert, settings.tls_key, settings.tls_min_version)
    limits = connection_limits(settings.max_connections)
    guard = ConnectionGuard(
        header_timeout_s=settings.header_timeout_s, max_connections=limits.max_connections
    )
    config = uvicorn.Config(
        create_app(settings, holder, canary=canary),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,  # the request log records every request, with its key and tokens
        server_header=False,
        proxy_headers=False,  # no proxy is trusted to tell us who the client is
        lifespan="on",
        timeout_graceful_shutdown=10,
        # h11 on asyncio, whatever else is installed: the connection limits hook into h11's
        # protocol and count on asyncio's accept loop (appliance.server.connections). TLS is
        # that protocol's too, not uvicorn's: the guard counts a connection from accept(), its
        # handshake included. The context is the one built here (a minimum version uvicorn
        # cannot set).
        http=guarded_protocol(guard, tls),  # type: ignore[arg-type]  # a factory, not a class
        loop="asyncio",
        ws="none",
        backlog=limits.backlog,
    )
    return _Server(config, scheme="http" if tls is None else "https")


class _Server(uvicorn.Server):
    """uvicorn's server, saying the scheme it serves: TLS is in the protocol (above), so
    uvicorn's own started message would say http."""

    def __init__(self, config: uvicorn.Config, *, scheme: str) -> None:
        super().__init__(config)
        self.scheme = scheme

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        for sock in listeners:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log.info("serving on %s://%s:%d (Ctrl+C to stop)", self.scheme, shown, port)


def run_server(
    settings: ServerSettings, holder: ModelHolder, *, canary: CanaryRoute | None = None
) -> None:
    """Serve until SIGINT/SIGTERM; then finish the requests in flight (up to 10 s) and return.

    uvicorn re-raises the stop signal once it has shut down, to the handler that was there
    before it; left at the default, that kills the process before the caller can close the
    model. A handler of ours that only notes the signal makes a requested stop a clean return
    (exit status 0 for the service manager).
    """
    server = build_server(settings, holder, canary=canary)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    stops: list[int] = []
    previous = {sig: signal.signal(sig, lambda n, _f: stops.append(n)) for sig in _STOP_SIGNALS}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops:
        log.info("stopped by signal %d", stops[0])


def bound_port(server: uvicorn.Server) -> int:
    """The port a started server listens on (useful with ``port=0``)."""
    for srv in server.servers:
        for sock in srv.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                port: int = sock.getsockname()[1]
                return port
    raise RuntimeError("the server is not listening")

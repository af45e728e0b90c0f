"""Client connections: a deadline for every request head, and a cap on open connections.

uvicorn 0.54 with h11 (the HTTP implementation ``build_server`` pins) arms no timer when a
connection opens, and its keep-alive timer (``timeout_keep_alive``) starts only once a response
has ended and is cancelled by the next byte that arrives. A client that sends a request head
slowly, part of one, or nothing at all keeps its socket for ever, and needs no key to do so.
At the open-file limit, ``accept()`` fails with EMFILE and every other client waits.

Two rules, kept by :class:`ConnectionGuard` through hooks in uvicorn's h11 protocol:

1. A connection delivers a whole request head (request line and headers) within
   ``header_timeout_s`` of opening, and of the end of its previous response; otherwise it is
   closed. A body is not timed here: only a caller with a valid key gets one read (the key
   middleware answers 401 first, and uvicorn then discards the unread body while the next
   deadline runs).
2. At most ``max_connections`` are open. One more closes the connection that has waited longest
   for a request head (a new one, or an idle keep-alive one); when every other connection is
   busy with a request, the newcomer is closed instead. A client with a key sends its head in
   one write, so it is waiting for milliseconds only: a flood of incomplete connections evicts
   its own oldest members, not the clients that make requests. (nginx reuses idle keep-alive
   connections the same way when it runs out of ``worker_connections``.)

The cap sits below the open-file limit by three accept batches and a reserve for the process's
own files (:func:`connection_limits`). asyncio accepts up to ``backlog`` connections per loop
iteration, and the protocol sees a connection only two iterations after its ``accept()`` (one to
make the transport, one to call ``connection_made``); a connection the guard drops keeps its
socket one more iteration (``abort()`` closes it from a callback). So at the end of any
iteration, besides the counted connections, up to one batch is accepted, one has its transport
pending, and one is being closed: the cap leaves room for all three.
With TLS the cap counts a connection from its ``accept()`` too, not from the end of its
handshake: :func:`guarded_protocol` wraps the h11 protocol in :class:`GuardedTLSProtocol`
(asyncio's own TLS protocol, which uvicorn would otherwise put there) and the guard counts and
times the TCP connection, so a flood of handshakes that never finish evicts its own oldest
members like any other incomplete connection, and the head deadline covers the handshake.
Given to uvicorn itself, TLS would hide a connection from the guard until its handshake ends,
with asyncio's 60 s handshake timeout as the only bound.

Why not uvicorn's ``limit_concurrency``: past it uvicorn answers 503 to new *requests* and
closes nothing, so incomplete connections would lock out the clients with keys.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import ssl
import time
from asyncio.sslproto import SSLProtocol
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from uvicorn.protocols.http.h11_impl import H11Protocol

from signing.errors import InputError, StateError

log = logging.getLogger(__name__)

# File descriptors kept for the process itself: the model file, the logs, the key file while
# it is read, the listening socket, the event loop's own, the standard streams.
RESERVED_FILES: Final = 64
MAX_BACKLOG: Final = 2048  # uvicorn's default
MIN_CONNECTIONS: Final = 16
# Accepted sockets the guard does not count yet, or no longer: see the module's docstring.
_BATCHES_IN_FLIGHT: Final = 3
_REPORT_EVERY_S: Final = 60.0


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    backlog: int  # listen queue, and connections accepted per loop iteration


def connection_limits(max_connections: int | None) -> ConnectionLimits:
    """The connection cap and the listen backlog that the open-file limit allows.

    ``max_connections`` None: as many as the limit allows. More than it allows is refused
    rather than lowered: the operator asked for something this process cannot keep.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    backlog = max(MIN_CONNECTIONS, min(MAX_BACKLOG, soft // 8))
    allowed = soft - _BATCHES_IN_FLIGHT * backlog - RESERVED_FILES
    if allowed < MIN_CONNECTIONS:
        raise StateError(
            f"the open-file limit of this process ({soft}) is too low to serve: raise it "
            "(LimitNOFILE= in the unit, ulimit -n in a shell)"
        )
    if max_connections is not None and max_connections > allowed:
        raise InputError(
            f"max_connections {max_connections} is more than the open-file limit ({soft}) "
            f"leaves room for ({allowed}): raise the limit or lower max_connections"
        )
    return ConnectionLimits(max_connections=max_connections or allowed, backlog=backlog)


class Guarded(Protocol):
    """What the guard counts: one TCP connection, which it can abort."""

    def abort_connection(self) -> None: ...


class ConnectionGuard:
    """Deadlines and the cap for the connections of one server (event loop thread only)."""

    def __init__(self, *, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self._open: set[Guarded] = set()
        # Connections waiting for a request head, the longest waiting first, with their timers.
        self._waiting: OrderedDict[Guarded, asyncio.TimerHandle] = OrderedDict()
        self._timed_out = 0
        self._evicted = 0
        self._reported = time.monotonic()

    @property
    def open(self) -> int:
        return len(self._open)

    def opened(self, conn: Guarded) -> None:
        self._open.add(conn)
        self.waiting(conn)
        if len(self._open) > self.max_connections:
            oldest = next(iter(self._waiting))  # conn itself, if no other one is waiting
            self._evicted += 1
            self._drop(oldest)

    def waiting(self, conn: Guarded) -> None:
        """``conn`` waits for a request head; its deadline runs from the first call."""
        if conn not in self._waiting and conn in self._open:
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.header_timeout_s, self._expire, conn)
            self._waiting[conn] = timer

    def busy(self, conn: Guarded) -> None:
        """``conn`` delivered a request head: no deadline and no eviction until it is answered."""
        timer = self._waiting.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def closed(self, conn: Guarded) -> None:
        self.busy(conn)
        self._open.discard(conn)

    def _expire(self, conn: Guarded) -> None:
        if conn in self._waiting:
            self._timed_out += 1
            self._drop(conn)

    def _drop(self, conn: Guarded) -> None:
        # Forget it now, not when the transport reports the loss: the count must be right for
        # the next connection made in the same loop iteration.
        self.closed(conn)
        # abort(), not close(): close() waits for unsent data, which a client that does not
        # read would keep there for ever. Nobody is owed anything here: no request is running.
        conn.abort_connection()
        self._report()

    def _report(self) -> None:
        now = time.monotonic()
        if now - self._reported < _REPORT_EVERY_S:
            return
        log.warning(
            "closed %d connections that sent no request head within %g s and %d over the cap "
            "of %d connections, in the last %.0f s",
            self._timed_out,
            self.header_timeout_s,
            self._evicted,
            self.max_connections,
            now - self._reported,
        )
        self._timed_out = self._evicted = 0
        self._reported = now


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, reporting to a :class:`ConnectionGuard` what each connection is
    doing: made, waiting for a request head, busy with a request, lost. Under TLS the
    :class:`GuardedTLSProtocol` around it is what the guard counts (``counted``)."""

    guard: ConnectionGuard  # set on the subclass that guarded_protocol() makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counted: Guarded = self

    def abort_connection(self) -> None:
        self.transport.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.counted is self:  # under TLS, counted at accept() by the wrapper
            self.guard.opened(self)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._report_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        self._report_state()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.guard.closed(self.counted)

    def _report_state(self) -> None:
        if self.transport.is_closing():
            return  # connection_lost follows
        if self.cycle is not None and not self.cycle.response_complete:
            self.guard.busy(self.counted)
        else:
            self.guard.waiting(self.counted)


class GuardedTLSProtocol(SSLProtocol):
    """asyncio's server-side TLS protocol around a :class:`GuardedH11Protocol`, counted by the
    guard from ``accept()``: the handshake is inside the head deadline and under the cap."""

    def __init__(
        self, app: GuardedH11Protocol, context: ssl.SSLContext, guard: ConnectionGuard
    ) -> None:
        super().__init__(
            asyncio.get_running_loop(),
            app,
            context,
            None,  # type: ignore[arg-type]  # no waiter: nobody awaits this handshake
            server_side=True,
            # The head deadline closes it first; this is asyncio's own bound, in whole seconds.
            ssl_handshake_timeout=max(1, math.ceil(guard.header_timeout_s)),
        )
        self._guard = guard
        self._tcp: asyncio.BaseTransport | None = None
        app.counted = self

    def abort_connection(self) -> None:
        if self._tcp is not None:
            self._tcp.abort()  # type: ignore[attr-defined]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport
        super().connection_made(transport)
        self._guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)  # the h11 protocol's too, once its handshake was done
        self._guard.closed(self)


def guarded_protocol(
    guard: ConnectionGuard, tls: ssl.SSLContext | None
) -> Callable[..., asyncio.BaseProtocol]:
    """The protocol factory for uvicorn's ``http=`` (uvicorn calls it with its own arguments
    for each accepted connection): h11 reporting to ``guard``, inside TLS with ``tls``. The
    server is then given no ``ssl`` of its own (appliance.server.run)."""
    h11 = type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
    if tls is None:
        return h11

    def made(**kwargs: Any) -> asyncio.BaseProtocol:
        return GuardedTLSProtocol(h11(**kwargs), tls, guard)

    return made

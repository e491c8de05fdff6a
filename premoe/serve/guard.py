"""Connection guard: read timeouts and per-client caps on connections that have not yet sent a
whole request (slowloris defence), as a uvicorn HTTP protocol.

A connection is *pending* from the moment it opens (and again after each response on a kept-alive
connection) until the request line, headers and body have all arrived. Pending connections are
what a slowloris attack holds; they cost the server nothing but a socket, so they must not count
against anything that real requests need:

- a new connection gets `header_timeout` seconds to send its request line and headers, then
  `body_timeout` seconds for the body; past either it is closed. A kept-alive connection waiting
  for its next request is idle, not slow: uvicorn's keep-alive timeout closes it, and the header
  clock starts with the first byte of that request. (Closing an idle kept-alive connection
  sooner than the client's own idle expiry loses requests: the client sends on the connection
  just as the server closes it, and gets a reset. On an H200 under 256 concurrent streams that
  was an `httpx.ReadError`.)
- at most `max_pending_per_client` pending connections per client address and
  `max_pending_total` overall: one more closes the oldest pending one (of that client, or
  overall) once that one has been pending for `min_age` seconds (a burst of real connections,
  each pending for microseconds, is never cut; past 4x the cap the oldest goes regardless). A real
  request sends its head at once, so it is never the oldest; an attacker's connections are.

Nothing counts open connections for admission (uvicorn's `limit_concurrency` counts them, and
1,000 idle sockets then turn every request, /health included, into a 503). Work is bounded
elsewhere: the engine's queue answers 429 when full.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

# Idle kept-alive connections are closed after this long. It must outlast the idle expiry of the
# clients' connection pools (httpx and the OpenAI SDK 5 s, aiohttp 15 s, Go's net/http 90 s): a
# server that closes first races a client sending on that connection, and the request is lost to
# a reset (uvicorn's 5 s default against httpx's 5 s did that under load).
KEEP_ALIVE_S = 120.0


@dataclass
class GuardSettings:
    header_timeout: float = 5.0
    body_timeout: float = 30.0
    max_pending_per_client: int = 1024
    max_pending_total: int = 4096
    min_age: float = 1.0


@dataclass
class GuardState:
    """Pending connections of one server, oldest first, overall and per client host."""

    settings: GuardSettings
    pending: OrderedDict[int, GuardedH11Protocol] = field(default_factory=OrderedDict)
    by_client: dict[str, OrderedDict[int, GuardedH11Protocol]] = field(default_factory=dict)
    evicted: int = 0
    timed_out: int = 0

    def add(self, conn: GuardedH11Protocol) -> None:
        key = id(conn)
        self.pending[key] = conn
        mine = self.by_client.setdefault(conn.client_host, OrderedDict())
        mine[key] = conn
        s = self.settings
        self._trim(mine, s.max_pending_per_client)
        self._trim(self.pending, s.max_pending_total)

    def _trim(self, conns: OrderedDict[int, GuardedH11Protocol], cap: int) -> None:
        now = time.monotonic()
        while len(conns) > cap:
            oldest = next(iter(conns.values()))
            if now - oldest.pending_since < self.settings.min_age and len(conns) <= 4 * cap:
                return
            self._evict(oldest)

    def discard(self, conn: GuardedH11Protocol) -> None:
        key = id(conn)
        self.pending.pop(key, None)
        mine = self.by_client.get(conn.client_host)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self.by_client[conn.client_host]

    def _evict(self, conn: GuardedH11Protocol) -> None:
        self.evicted += 1
        conn.drop("too many pending connections from one client")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the guard above; `bind(state)` makes a class for one server."""

    guard: GuardState

    @classmethod
    def bind(cls, state: GuardState) -> type[GuardedH11Protocol]:
        return type("GuardedH11Protocol", (cls,), {"guard": state})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._pending = False
        self._have_head = False
        self.client_host = "?"
        self.pending_since = 0.0

    # -- pending state ---------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _start_pending(self, *, idle: bool) -> None:
        """Pending from now; the header clock runs at once unless the connection is `idle` (kept
        alive after a response), where it starts with the next request's first byte."""
        self._have_head = False
        if not self._pending:
            self._pending = True
            self.pending_since = time.monotonic()
            self.guard.add(self)  # may evict (close) this very connection if it is the oldest
        if self._pending and not idle:
            self._arm(self.guard.settings.header_timeout)

    def _stop_pending(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pending:
            self._pending = False
            self.guard.discard(self)

    def _expired(self) -> None:
        self._timer = None
        if self._pending:
            self.guard.timed_out += 1
            what = "body" if self._have_head else "request headers"
            self.drop(f"the {what} did not arrive in time")

    def drop(self, why: str) -> None:
        """Close this connection (it never sent a whole request)."""
        self._stop_pending()
        log.debug("closing connection from %s: %s", self.client_host, why)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
        if not self.transport.is_closing():
            self.transport.close()

    # -- protocol hooks --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.client_host = self.client[0] if self.client else "?"
        self._start_pending(idle=False)

    def data_received(self, data: bytes) -> None:
        if self._pending and self._timer is None and not self._have_head:
            self._arm(self.guard.settings.header_timeout)  # an idle connection's next request
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_pending()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if not self._pending:
            return
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._stop_pending()  # the whole request is in (or the connection is over)
        elif self.cycle is not before and not self._have_head:
            self._have_head = True  # head complete, body still arriving
            self._arm(self.guard.settings.body_timeout)

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._start_pending(idle=True)  # kept alive: its next request is guarded too
        super().on_response_complete()  # may run a pipelined request (handle_events above)

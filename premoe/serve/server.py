"""Running the app under uvicorn: the connection guard (guard.py) and a graceful shutdown.

On SIGTERM or SIGINT the server

1. stops accepting connections and the engine stops admitting requests (new ones: 503);
2. lets in-flight requests finish for up to `shutdown_timeout` seconds;
3. then ends every request still open with an error: a stream gets an SSE error event and
   `data: [DONE]`, a non-streamed request a 503 JSON error;
4. gives the handlers a moment to flush, runs the app's shutdown (the decode worker stops) and
   exits with status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from premoe.serve.engine import Engine
from premoe.serve.guard import KEEP_ALIVE_S, GuardedH11Protocol, GuardSettings, GuardState

log = logging.getLogger(__name__)

FLUSH_S = 2.0  # after cancelling: time for handlers to write their last event


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    shutdown_timeout: float = 30.0
    keep_alive_timeout: float = KEEP_ALIVE_S
    guard: GuardSettings | None = None
    log_level: str = "warning"


class PremoeServer(uvicorn.Server):
    """uvicorn.Server that drains the engine before closing connections, and exits 0 on a
    shutdown signal (uvicorn re-raises the signal by default, which kills the process)."""

    def __init__(self, config: uvicorn.Config, engine: Engine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._captured_signals.clear()  # a requested shutdown is a clean exit

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections
        await drain(self.engine, self.shutdown_timeout, lambda: self.force_exit)
        # let handlers that just received their final event write it and return
        deadline = time.monotonic() + FLUSH_S
        while self.server_state.tasks and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        await super().shutdown(sockets)


async def drain(engine: Engine, timeout: float, forced: Any = lambda: False) -> int:
    """Stop admitting; wait up to `timeout` s for in-flight requests; fail the rest with a 503.
    Returns how many requests were cut."""
    engine.begin_shutdown()
    deadline = time.monotonic() + timeout
    if engine.in_flight():
        log.info("shutting down: waiting up to %.0f s for %d requests", timeout, engine.in_flight())
    while engine.in_flight() and time.monotonic() < deadline and not forced():
        await asyncio.sleep(0.05)
    cut = engine.abort_all("the server is shutting down")
    if cut:
        log.warning("shutting down: ended %d requests that were still running", cut)
    return cut


def make_server(app: Any, engine: Engine, opts: ServerOptions) -> PremoeServer:
    state = GuardState(opts.guard or GuardSettings())
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level=opts.log_level,
        http=GuardedH11Protocol.bind(state),
        timeout_keep_alive=int(max(1, opts.keep_alive_timeout)),
        # the drain above is the graceful part; what remains after it is only flushing
        timeout_graceful_shutdown=int(FLUSH_S) + 1,
    )
    server = PremoeServer(config, engine, opts.shutdown_timeout)
    server.guard_state = state  # type: ignore[attr-defined]
    return server


def run_server(app: Any, engine: Engine, opts: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see the module docstring)."""
    make_server(app, engine, opts).run()

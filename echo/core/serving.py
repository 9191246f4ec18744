"""Run an ASGI app under uvicorn with the settings measured to be fastest here.

uvloop + httptools, Echo's own WebSocket protocol (:mod:`echo.transport.websocket_protocol`:
one frame encoding per message for all its recipients) and no per-message deflate: see
``shared/notes/performance.md`` (deflate alone cut throughput to 0.34x).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from echo.core import gc_pauses
from echo.transport.http_guard import Guard, guarded_protocol
from echo.transport.websocket_protocol import EchoWebSocketProtocol

DEFAULT_HEADER_TIMEOUT = 10.0


def uvicorn_config(app: Any, host: str, port: int, log_level: str = "info",
                   ws_max_size: int = 16 * 1024 * 1024, guard: Guard | None = None) -> uvicorn.Config:
    """``ws_max_size``: the largest WebSocket message uvicorn reads before the transport
    checks it: the transport's ``max_payload``, so an oversize message is refused (1009)
    before 16 MiB of it is buffered."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        # uvicorn's info lines (one per websocket) drown Echo's own; keep its warnings
        log_level=log_level if log_level in ("debug", "warning", "error", "critical") else "warning",
        loop="auto",
        http=guarded_protocol(guard or Guard(DEFAULT_HEADER_TIMEOUT, 0)),
        ws=EchoWebSocketProtocol,
        ws_per_message_deflate=False,
        ws_max_size=ws_max_size,
        # Engine.IO's heartbeat already checks every connection; uvicorn's own WebSocket
        # pings doubled the idle traffic (py-spy on 10,000 idle connections)
        ws_ping_interval=None,
        ws_ping_timeout=None,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=int(guard.keep_alive_timeout) if guard else 5,
    )


class EchoUvicorn(uvicorn.Server):
    """uvicorn's server with two hooks: once it listens, and before it closes connections."""

    def __init__(self, config: uvicorn.Config,
                 on_ready: Callable[[], None] | None = None,
                 before_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        super().__init__(config)
        self.on_ready = on_ready
        self.before_shutdown = before_shutdown

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started:
            # what exists now (modules, app, settings) lives as long as the process: keep it
            # out of every later full garbage collection, whose pause grows with the heap
            gc.freeze()
            gc_pauses.install()
            if self.on_ready is not None:
                self.on_ready()

    async def shutdown(self, sockets: Any = None) -> None:
        if self.before_shutdown is not None:
            await self.before_shutdown()
        await super().shutdown(sockets)


def run(app: Any, host: str, port: int, log_level: str = "info",
        on_ready: Callable[[], None] | None = None,
        before_shutdown: Callable[[], Awaitable[None]] | None = None,
        ws_max_size: int = 16 * 1024 * 1024, guard: Guard | None = None) -> None:
    """Serve until SIGINT/SIGTERM; ``before_shutdown`` runs first (draining in-flight work).
    The socket is bound here, before anything starts, so a port in use raises OSError for
    the caller to explain (uvicorn would log it and exit)."""
    config = uvicorn_config(app, host, port, log_level, ws_max_size, guard)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.create_server((host, port), family=family, backlog=config.backlog)
    EchoUvicorn(config, on_ready, before_shutdown).run(sockets=[listening])

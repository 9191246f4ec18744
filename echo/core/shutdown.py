"""Graceful shutdown: refuse new work, finish what is in flight, tell clients, flush.

After this, uvicorn closes the transports; clients see a transport close (not a server
disconnect), so socket.io clients reconnect, to another node behind a load balancer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from echo.core import protocol
from echo.core.protocol import ErrorCode
from echo.core.realtime import Realtime

log = logging.getLogger("echo.shutdown")

NOTICE = {**protocol.error(ErrorCode.SERVER_SHUTDOWN,
                           "this node is shutting down; reconnecting")["error"],
          "event": "shutdown"}


async def drain(realtime: Realtime, grace: float) -> None:
    """Give in-flight messages ``grace`` seconds, then notify every client and flush."""
    realtime.draining = True
    try:
        await asyncio.wait_for(realtime.pipeline.idle.wait(), grace)
    except TimeoutError:
        log.warning("shutting down with %d messages still in flight",
                    realtime.pipeline.in_flight)
    transport = realtime.transport
    for conn in list(transport.connections()):
        conn.emit("error", NOTICE)
    # the notice and the last deliveries: on the sockets, and sent to other nodes
    await flush_within(transport.flush, 1.0)
    await flush_within(realtime.broker.flush, 2.0)


async def flush_within(flush: Callable[[], Awaitable[None]], seconds: float) -> None:
    """Wait for ``flush`` at most ``seconds``: a stop is never held up by a stuck peer."""
    try:
        async with asyncio.timeout(seconds):
            await flush()
    except TimeoutError:
        log.warning("shutting down before everything was sent (%s)", flush.__qualname__)

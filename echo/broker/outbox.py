"""Frames on their way to one Redis server: queued without waiting, sent in order, pipelined.

``put`` never waits. One task per server sends what gathered while the previous pipeline
was in flight, so a burst costs a handful of round trips and one connection, and a node's
frames reach Redis (and every other node) in the order it published them. The queue is
bounded: a frame that finds it full is dropped and counted, never silently.

Each frame is published by a script that also counts the nodes registered as serving the
channel: fewer receivers than that means some node missed it (:mod:`echo.broker.scripts`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import MovedError

from echo.broker.base import BrokerStats
from echo.broker.scripts import Call, LuaScript, run_pipelined
from echo.broker.throttle import ThrottledLog

log = logging.getLogger("echo.redis")

MAX_OUTBOX = 10_000
"""Frames waiting for one Redis server beyond which new ones are dropped (and counted)."""
MAX_BATCH = 2_000
"""Frames in one pipeline: a long outage's backlog goes out in bounded round trips."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    name: bytes
    """The channel's Redis channel."""
    registry: bytes
    """The channel's registry of serving nodes."""
    payload: bytes


class Outbox:
    def __init__(self, client: aioredis.Redis, label: str, script: LuaScript,
                 stats: BrokerStats, warn: ThrottledLog,
                 on_moved: Callable[[list[Outgoing]], None] | None = None) -> None:
        self.client = client
        self.label = label
        self.script = script
        self.stats = stats
        self.warn = warn
        self.on_moved = on_moved
        self._queue: deque[Outgoing] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, item: Outgoing) -> None:
        if len(self._queue) >= MAX_OUTBOX:
            self.stats.publish_failures += 1
            self.warn.warning("overflow", 1, "%d frame(s) not sent to other nodes: %d already "
                              "wait for Redis %s", MAX_OUTBOX, self.label)
            return
        self._queue.append(item)
        if self._sender is None:
            self._idle.clear()
            self._sender = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        try:
            while self._queue:
                count = min(len(self._queue), MAX_BATCH)
                batch = [self._queue.popleft() for _ in range(count)]
                await self._send_batch(batch)
        finally:
            self._sender = None
            self._idle.set()

    async def _send_batch(self, batch: list[Outgoing]) -> None:
        calls: list[Call] = [(self.script, (item.name, item.registry), (item.payload,))
                             for item in batch]
        try:
            results = await run_pipelined(self.client, calls)
        except asyncio.CancelledError:
            self.stats.publish_failures += len(batch)
            raise
        except Exception as exc:  # Redis down: this node's subscribers already have them
            self.stats.publish_failures += len(batch)
            self.warn.warning("send", len(batch), "%d frame(s) not sent to other nodes "
                              "(Redis %s: %s)", self.label, exc)
            return
        moved: list[Outgoing] = []
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, MovedError) and self.on_moved is not None:
                moved.append(item)
            elif isinstance(result, Exception):
                self.stats.publish_failures += 1
                self.warn.warning("refused", 1, "%d frame(s) not sent to other nodes "
                                  "(Redis %s refused: %s)", self.label, result)
            else:
                self.stats.published += 1
                receivers, serving = int(result[0]), int(result[1])
                if serving > receivers:
                    self.stats.lost_receivers += serving - receivers
                    self.warn.warning(
                        "lost", serving - receivers,
                        "%d delivery(ies) to other nodes missed: a node serving %r was "
                        "not subscribed (it is re-subscribing, or died)", item.name[:120])
        if moved and self.on_moved is not None:
            self.on_moved(moved)

    async def flush(self) -> None:
        """Wait until the queue is sent (the caller bounds the wait)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop sending; what is still queued is counted as not sent."""
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
        self.stats.publish_failures += len(self._queue)
        self._queue.clear()

"""This node's presence changes on their way to one Redis server: queued, in order, pipelined.

A connect storm is thousands of presence writes within a second, each one awaited by the
connection that joins; a round trip each would queue them all on the connection pool. Here
they are a :class:`~echo.broker.pipelined.PipelinedQueue`: ``put`` returns at once, a burst
goes out in a few pipelines on one connection, and Redis applies one node's changes in the
order it made them (an add and the remove right after it never swap). A write that fails or
finds the queue full is reported to ``on_failed``, which counts it and has the channel's
presence re-synchronised from this node's own record (nothing is lost for good).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from echo.broker.pipelined import PipelinedQueue
from echo.broker.scripts import Call, run_pipelined


@dataclass(frozen=True, slots=True)
class PresenceWrite:
    name: bytes
    """The channel's Redis name (whose presence the write changes)."""
    call: Call


class PresenceWrites(PipelinedQueue[PresenceWrite]):
    limit = 50_000
    batch = 1_000

    def __init__(self, client: aioredis.Redis, label: str,
                 on_failed: Callable[[list[bytes], Exception], None]) -> None:
        super().__init__(label)
        self.client = client
        self.on_failed = on_failed

    def refused(self, item: PresenceWrite) -> None:
        self.on_failed([item.name], OverflowError(
            f"{self.limit} presence writes already wait for Redis {self.label}"))

    def lost(self, batch: list[PresenceWrite], count: int) -> None:
        self.on_failed([write.name for write in batch[len(batch) - count:]],
                       RuntimeError("the pipeline was abandoned"))

    async def send(self, batch: list[PresenceWrite]) -> None:
        try:
            results = await run_pipelined(self.client, [write.call for write in batch])
        except Exception as exc:  # Redis down
            self.unsettled = 0
            self.on_failed([write.name for write in batch], exc)
            return
        self.unsettled = 0
        failed = [(write.name, result) for write, result in zip(batch, results, strict=True)
                  if isinstance(result, Exception)]
        if failed:
            self.on_failed([name for name, _ in failed], failed[0][1])

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

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from echo.broker.pipelined import PipelinedQueue
from echo.broker.scripts import Call, run_pipelined


@dataclass(frozen=True, slots=True)
class PresenceWrite:
    name: bytes
    """The channel's Redis name (whose presence the write changes)."""
    call: Call
    done: asyncio.Future[Any] | None = None
    """Given: settled with the call's result (or its failure), for a caller that waits."""

    def settle(self, result: Any) -> None:
        if self.done is not None and not self.done.done():
            if isinstance(result, BaseException):
                self.done.set_exception(result)
            else:
                self.done.set_result(result)


class PresenceWrites(PipelinedQueue[PresenceWrite]):
    limit = 50_000
    batch = 1_000

    def __init__(self, client: aioredis.Redis, label: str,
                 on_failed: Callable[[list[bytes], Exception], None]) -> None:
        super().__init__(label)
        self.client = client
        self.on_failed = on_failed

    def refused(self, item: PresenceWrite) -> None:
        error = OverflowError(f"{self.limit} presence writes already wait for Redis {self.label}")
        item.settle(error)
        self.on_failed([item.name], error)

    def lost(self, batch: list[PresenceWrite], count: int) -> None:
        error = RuntimeError("the pipeline was abandoned")
        for write in batch[len(batch) - count:]:
            write.settle(error)
        self.on_failed([write.name for write in batch[len(batch) - count:]], error)

    async def send(self, batch: list[PresenceWrite]) -> None:
        try:
            results = await run_pipelined(self.client, [write.call for write in batch])
        except Exception as exc:  # Redis down
            self.unsettled = 0
            for write in batch:
                write.settle(exc)
            self.on_failed([write.name for write in batch], exc)
            return
        self.unsettled = 0
        for write, result in zip(batch, results, strict=True):
            write.settle(result)
        failed = [(write.name, result) for write, result in zip(batch, results, strict=True)
                  if isinstance(result, Exception)]
        if failed:
            self.on_failed([name for name, _ in failed], failed[0][1])

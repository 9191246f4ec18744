"""Commands for one Redis server, queued without waiting and sent in order, a pipeline at a time.

``put`` never waits. One task per queue sends what gathered while the previous pipeline was
in flight, so a burst costs a handful of round trips on one connection (not one pooled
connection per caller), and Redis runs the commands in the order they were put. The queue is
bounded: an item that finds it full is refused and counted by the subclass, never silently.
Whatever stops a pipeline half-way (cancellation, an error nobody expected) is logged and
the items not yet accounted for are counted by the subclass: no batch vanishes untraced.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("echo.redis")

T = TypeVar("T")


class PipelinedQueue(abc.ABC, Generic[T]):
    limit = 10_000
    """Items waiting beyond which ``put`` refuses new ones."""
    batch = 2_000
    """Items in one pipeline: a long outage's backlog goes out in bounded round trips."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.in_flight: list[T] = []
        """The pipeline being sent now (empty when none)."""
        self.unsettled = 0
        """Items of ``in_flight`` whose outcome the subclass has not counted yet."""
        self.queue: deque[T] = deque()
        self.sender: asyncio.Task[None] | None = None
        self.idle = asyncio.Event()
        self.idle.set()

    def __len__(self) -> int:
        return len(self.queue)

    @property
    def busy(self) -> bool:
        """Something is queued or in flight."""
        return self.sender is not None

    def put(self, item: T) -> bool:
        """Queue ``item``; False (and ``refused``) when the queue is full."""
        if len(self.queue) >= self.limit:
            self.refused(item)
            return False
        self.queue.append(item)
        if self.sender is None:
            self.idle.clear()
            self.sender = asyncio.get_running_loop().create_task(self._send())
        return True

    def take(self, match: Callable[[T], bool]) -> list[T]:
        """Remove the queued (not yet sent) items ``match`` picks; returned in queue order."""
        kept: deque[T] = deque()
        taken: list[T] = []
        for item in self.queue:
            (taken if match(item) else kept).append(item)
        self.queue = kept
        return taken

    async def _send(self) -> None:
        try:
            while self.queue:
                count = min(len(self.queue), self.batch)
                batch = [self.queue.popleft() for _ in range(count)]
                self.in_flight, self.unsettled = batch, count
                try:
                    await self.send(batch)
                except asyncio.CancelledError:
                    self.lost(batch, self.unsettled)
                    raise
                except Exception:
                    log.exception("a pipeline of %d command(s) to Redis %s failed unexpectedly",
                                  count, self.label)
                    self.lost(batch, self.unsettled)
                finally:
                    self.in_flight, self.unsettled = [], 0
                    try:
                        self.finished()
                    except Exception:
                        log.exception("after a pipeline to Redis %s", self.label)
        finally:
            self.sender = None
            self.idle.set()

    @abc.abstractmethod
    async def send(self, batch: list[T]) -> None:
        """Send ``batch`` as one pipeline and count each item's outcome, lowering
        ``unsettled`` as it goes (what is left is passed to ``lost`` if this raises)."""

    @abc.abstractmethod
    def refused(self, item: T) -> None:
        """``item`` found the queue full."""

    @abc.abstractmethod
    def lost(self, batch: list[T], count: int) -> None:
        """The last ``count`` outcomes of ``batch`` will never be known: count them as failed."""

    def finished(self) -> None:
        """A pipeline is over (sent, failed or abandoned); ``in_flight`` is empty again."""

    async def flush(self) -> None:
        """Wait until the queue is sent (the caller bounds the wait)."""
        await self.idle.wait()

    async def close(self) -> None:
        """Stop sending; what is still queued is passed to ``lost``."""
        if self.sender is not None:
            self.sender.cancel()
            await asyncio.gather(self.sender, return_exceptions=True)
            self.sender = None  # a task cancelled before it ran never reached its finally
            self.idle.set()
        if self.queue:
            remaining = list(self.queue)
            self.queue.clear()
            self.lost(remaining, len(remaining))

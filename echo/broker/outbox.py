"""Frames on their way to one Redis server: queued without waiting, sent in order, pipelined.

A :class:`~echo.broker.pipelined.PipelinedQueue` of frames: a node's frames reach Redis (and
every other node) in the order it published them, a burst costs a handful of round trips on
one connection, and a frame that finds the queue full is dropped and counted, never silently.

Each frame is published by a script that also counts the nodes registered as serving the
channel: fewer receivers than that means some node missed it (:mod:`echo.broker.scripts`).
On a Cluster, frames the server redirected (``MOVED``: their slot moved; ``ASK`` or
``TRYAGAIN``: it is moving) go back to the broker after each pipeline (``on_settled``),
which keeps them in order ahead of what the channel publishes next (:mod:`echo.broker.moves`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import AskError, TryAgainError

from echo.broker.base import BrokerStats, Position
from echo.broker.pipelined import PipelinedQueue
from echo.broker.scripts import Arg, Call, LuaScript, run_pipelined
from echo.broker.throttle import ThrottledLog

MAX_OUTBOX = 10_000
"""Frames waiting for one Redis server beyond which new ones are dropped (and counted)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass costs three times as much to make
class Outgoing:
    name: bytes
    """The channel's Redis channel."""
    registry: bytes
    """The channel's registry of serving nodes."""
    payload: bytes
    history: HistoryWrite | None = None
    """A history channel's message: numbered, kept and published by one script."""


@dataclass(slots=True)
class HistoryWrite:
    stream: bytes
    position: bytes
    args: tuple[Arg, ...]
    """After the header: packet head, size, ttl (ms), position ttl (ms), candidate epoch."""
    done: asyncio.Future[Position]


def fail(item: Outgoing, why: str) -> None:
    """A frame will not be sent: a history message's publisher hears why."""
    if item.history is not None and not item.history.done.done():
        item.history.done.set_exception(ConnectionError(why))


class Outbox(PipelinedQueue[Outgoing]):
    limit = MAX_OUTBOX

    def __init__(self, client: aioredis.Redis, label: str, script: LuaScript,
                 stats: BrokerStats, warn: ThrottledLog,
                 on_settled: Callable[[Outbox, list[Outgoing]], None] | None = None,
                 history_script: LuaScript | None = None) -> None:
        super().__init__(label)
        self.client = client
        self.script = script
        self.history_script = history_script
        self.stats = stats
        self.warn = warn
        self.on_settled = on_settled
        """Called after every pipeline with its redirected frames (often none)."""
        self.moved: list[Outgoing] = []

    def refused(self, item: Outgoing) -> None:
        fail(item, f"the queue to Redis {self.label} is full")
        self.stats.publish_failures += 1
        self.warn.warning("overflow", 1, "%d frame(s) not sent to other nodes: %d already "
                          "wait for Redis %s", MAX_OUTBOX, self.label)

    def lost(self, batch: list[Outgoing], count: int) -> None:
        for item in batch:
            fail(item, f"not sent: the connection to Redis {self.label} closed")
        self.stats.publish_failures += count

    def _call(self, item: Outgoing) -> Call:
        history = item.history
        if history is None:
            return (self.script, (item.name, item.registry), (item.payload,))
        assert self.history_script is not None
        return (self.history_script, (item.name, item.registry, history.stream, history.position),
                (item.payload, *history.args))

    async def send(self, batch: list[Outgoing]) -> None:
        calls = [self._call(item) for item in batch]
        try:
            results = await run_pipelined(self.client, calls)
        except Exception as exc:  # Redis down: this node's subscribers already have them
            for item in batch:
                fail(item, f"Redis {self.label}: {exc}")
            self.stats.publish_failures += len(batch)
            self.unsettled = 0
            self.warn.warning("send", len(batch), "%d frame(s) not sent to other nodes "
                              "(Redis %s: %s)", self.label, exc)
            return
        stats = self.stats
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, AskError | TryAgainError) and self.on_settled is not None:
                self.moved.append(item)  # handed to on_settled when the pipeline is over
            elif isinstance(result, Exception):
                fail(item, f"Redis {self.label} refused it: {result}")
                stats.publish_failures += 1
                self.warn.warning("refused", 1, "%d frame(s) not sent to other nodes "
                                  "(Redis %s refused: %s)", self.label, result)
            else:
                receivers, serving = int(result[0]), int(result[1])
                if item.history is not None and not item.history.done.done():
                    epoch = result[3]
                    if int(result[2]) < 0:
                        fail(item, "its history write was replayed after a lost reply; it was "
                                   "kept once, at an offset no longer known")
                    else:
                        item.history.done.set_result(Position(
                            int(result[2]), epoch.decode() if isinstance(epoch, bytes) else str(epoch),
                            bool(int(result[4]))))
                stats.published += 1
                if serving > receivers:
                    stats.lost_receivers += serving - receivers
                    self.warn.warning(
                        "lost", serving - receivers,
                        "%d delivery(ies) to other nodes missed: a node serving %r was "
                        "not subscribed (it is re-subscribing, or died)", item.name[:120])
            self.unsettled -= 1

    def finished(self) -> None:
        moved, self.moved = self.moved, []
        if self.on_settled is None:
            return
        try:
            self.on_settled(self, moved)
        except Exception:
            self.stats.publish_failures += len(moved)
            raise

"""One node, no backend: ``echoctl dev`` and a single ``echoctl serve`` without Redis.

History lives in this process: a stream per channel (its last ``size`` messages), begun with
a new epoch whenever the process starts or the stream was forgotten (no publish for
``meta_ttl`` seconds, or pushed out by :data:`MAX_STREAMS` newer ones), so a client holding
a position from before is told it was not recovered.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from typing import Any, Final

from echo.broker.base import Broker, HistoryPolicy, HistoryRead, Position, new_epoch, positioned
from echo.transport.base import Frame

MAX_STREAMS: Final = 100_000
"""History streams kept at once; the least recently used beyond that are forgotten."""
MAX_IDEMPOTENCY_KEYS: Final = 100_000
MAX_QUEUED: Final = 100_000
"""Items a work queue holds at most (webhooks of a receiver that is down)."""
"""Idempotency keys remembered at once; the oldest beyond that are forgotten early."""


class Stream:
    """One channel's kept messages: ``(offset, monotonic time, frame)``, oldest first."""

    __slots__ = ("entries", "epoch", "offset", "touched")

    def __init__(self, size: int) -> None:
        self.epoch = new_epoch()
        self.offset = 0
        self.entries: deque[tuple[int, float, Frame]] = deque(maxlen=size)
        self.touched = time.monotonic()


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._presence: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._occupied: set[tuple[str, str]] = set()
        """Channels last reported occupied by ``occupancy_change``."""
        self._streams: OrderedDict[tuple[str, str], Stream] = OrderedDict()
        self._keys: OrderedDict[tuple[str, str, str], tuple[float, dict[str, Any]]] = OrderedDict()
        self._queues: dict[str, dict[bytes, float]] = {}

    def describe(self) -> str:
        return "memory (this node only)"

    def publish(self, app: str, channel: str, frame: Frame) -> None:
        self.deliver(app, channel, frame)

    async def subscribe(self, app: str, channel: str) -> None:
        return None  # every frame is local: nothing to subscribe to

    async def unsubscribe(self, app: str, channel: str) -> None:
        return None

    # -- history ---------------------------------------------------------------------------

    def _stream(self, app: str, channel: str, policy: HistoryPolicy) -> tuple[Stream, bool]:
        key = (app, channel)
        stream = self._streams.get(key)
        now = time.monotonic()
        fresh = stream is None or now - stream.touched > policy.meta_ttl
        if stream is None or fresh:
            stream = self._streams[key] = Stream(policy.size)
            if len(self._streams) > MAX_STREAMS:
                self._streams.popitem(last=False)
        elif stream.entries.maxlen != policy.size:  # the policy changed: keep what fits
            stream.entries = deque(stream.entries, maxlen=policy.size)
        self._streams.move_to_end(key)
        stream.touched = now
        entries, oldest = stream.entries, now - policy.ttl
        while entries and entries[0][1] < oldest:  # expired: free it (offsets stay as they are)
            entries.popleft()
        return stream, fresh

    def publish_history(self, app: str, channel: str, head: str,
                        policy: HistoryPolicy) -> asyncio.Future[Position]:
        stream, fresh = self._stream(app, channel, policy)
        stream.offset += 1
        frame = Frame(text=positioned(head, stream.offset, stream.epoch), offset=stream.offset)
        stream.entries.append((stream.offset, stream.touched, frame))
        done: asyncio.Future[Position] = asyncio.get_running_loop().create_future()
        done.set_result(Position(stream.offset, stream.epoch, fresh))
        self.deliver(app, channel, frame)
        return done

    async def history(self, app: str, channel: str, policy: HistoryPolicy, *,
                      since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryRead:
        stream, fresh = self._stream(app, channel, policy)
        oldest = time.monotonic() - policy.ttl
        after = -1 if since is None else since
        wanted = [entry for entry in stream.entries if entry[0] > after]
        live = [frame for _, at, frame in wanted if at >= oldest]
        frames = live[-limit:][::-1] if reverse else live[:limit]
        return HistoryRead(Position(stream.offset, stream.epoch, fresh), frames,
                           expired=len(live) < len(wanted))

    # -- idempotency -----------------------------------------------------------------------

    async def claim_idempotency(self, app: str, channel: str, key: str,
                                window: float) -> dict[str, Any] | None:
        now = time.monotonic()
        while self._keys:  # forget what has expired (oldest first)
            first = next(iter(self._keys.values()))
            if first[0] > now:
                break
            self._keys.popitem(last=False)
        known = self._keys.get((app, channel, key))
        if known is not None:
            return dict(known[1])
        self._keys[(app, channel, key)] = (now + window, {})
        if len(self._keys) > MAX_IDEMPOTENCY_KEYS:
            self._keys.popitem(last=False)
        return None

    async def settle_idempotency(self, app: str, channel: str, key: str,
                                 ack: dict[str, Any] | None, window: float) -> None:
        if ack is None:
            self._keys.pop((app, channel, key), None)
        elif (app, channel, key) in self._keys:
            expires, _ = self._keys[(app, channel, key)]
            self._keys[(app, channel, key)] = (expires, dict(ack))

    # -- presence --------------------------------------------------------------------------

    async def presence_add(self, app: str, channel: str, member: str,
                           info: dict[str, Any]) -> None:
        self._presence.setdefault((app, channel), {})[member] = info

    async def presence_remove(self, app: str, channel: str, member: str) -> None:
        members = self._presence.get((app, channel))
        if members is not None:
            members.pop(member, None)
            if not members:
                del self._presence[(app, channel)]

    async def presence(self, app: str, channel: str) -> dict[str, dict[str, Any]]:
        return dict(self._presence.get((app, channel), {}))

    async def occupancy_change(self, app: str, channel: str) -> bool | None:
        occupied = (app, channel) in self._presence
        if occupied == ((app, channel) in self._occupied):
            return None
        if occupied:
            self._occupied.add((app, channel))
        else:
            self._occupied.discard((app, channel))
        return occupied

    async def occupied(self, app: str, limit: int) -> list[str]:
        return sorted(channel for key_app, channel in self._presence if key_app == app)[:limit]

    # -- work queues (in process: they end with it) ------------------------------------------

    async def enqueue(self, queue: str, items: list[bytes]) -> None:
        due = self._queues.setdefault(queue, {})
        now = time.monotonic()
        for item in items:
            if len(due) >= MAX_QUEUED:
                raise OverflowError(f"queue {queue[:80]!r} holds {MAX_QUEUED} items")
            due[item] = now

    async def claim(self, queue: str, limit: int, lease: float) -> list[bytes]:
        due = self._queues.get(queue)
        if not due:
            return []
        now = time.monotonic()
        ready = sorted((at, item) for item, at in due.items() if at <= now)[:limit]
        for _, item in ready:
            due[item] = now + lease
        return [item for _, item in ready]

    async def settle(self, queue: str, item: bytes, again: bytes | None, delay: float) -> None:
        due = self._queues.setdefault(queue, {})
        due.pop(item, None)
        if again is not None:
            due[again] = time.monotonic() + delay

    def history_entries(self) -> int | None:
        return sum(len(stream.entries) for stream in self._streams.values())

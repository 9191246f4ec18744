"""A channel's frames stay in publish order while its Redis Cluster slot moves to another primary.

While a slot moves, a channel's frames are in several places at once: refused by the old
owner (``MOVED``), still queued for it, or in a pipeline in flight to it, and the node keeps
publishing. Sending what comes next straight to the new owner would put newer frames ahead
of older ones, and receivers would drop the older ones as duplicates of frames they already
passed. So a channel whose frames are split is *held*: what it publishes waits here, behind
what the old owner refused or still had queued, and it is released (everything, in publish
order, to the new owner's outbox) once nothing of it can still come back from the old owner
and the slot map names the new owner.

A channel is held when its server redirects a frame (MOVED, or ASK and TRYAGAIN while the
slot's keys migrate; the slot map is then re-read, at most every 0.5 s, and the frames sent
again) or when a new slot map moves it while a pipeline with its frames is in flight to
the old owner. Queued
frames of a channel that moved are moved to the new owner's outbox at once, before anyone
awaits, so no later frame can overtake them.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable

from echo.broker.base import BrokerStats
from echo.broker.outbox import MAX_OUTBOX, Outbox, Outgoing, fail
from echo.broker.throttle import ThrottledLog


class Hold:
    """A held channel's frames, oldest first."""

    __slots__ = ("items", "refused_by", "waiting")

    def __init__(self, *, waiting: Outbox | None = None, refused_by: Outbox | None = None) -> None:
        self.items: deque[Outgoing] = deque()
        self.waiting = waiting
        """An outbox with a pipeline in flight that holds some of the channel's frames."""
        self.refused_by = refused_by
        """The outbox whose server answered MOVED: no use sending there until the map changes."""


class SlotMoves:
    def __init__(self, route: Callable[[bytes], Outbox | None], stats: BrokerStats,
                 warn: ThrottledLog) -> None:
        self.route = route
        self.stats = stats
        self.warn = warn
        self.held: dict[bytes, Hold] = {}
        self.version = 0
        """Changes when the slot map changes or a channel is held or released: a publisher's
        cached outbox for a channel is good while this is the same."""

    def hold(self, name: bytes, item: Outgoing) -> bool:
        """Put ``item`` behind its channel's held frames; False if the channel is not held."""
        hold = self.held.get(name)
        if hold is None:
            return False
        if len(hold.items) >= MAX_OUTBOX:
            fail(item, "too many frames wait for the channel's new Redis Cluster node")
            self._failed(1, "%d frame(s) not sent to other nodes: their channel's slot is "
                            "moving and too many wait for the new owner")
        else:
            hold.items.append(item)
        return True

    def settled(self, outbox: Outbox, moved: list[Outgoing]) -> bool:
        """A pipeline to ``outbox`` is over and its server redirected ``moved``.

        Returns whether the slot map must be re-read (a server refused a channel the map
        still places there)."""
        refused: dict[bytes, list[Outgoing]] = {}
        for item in moved:
            refused.setdefault(item.name, []).append(item)
        fresh = {name for name in refused if name not in self.held}
        if fresh:
            self.held.update((name, Hold(refused_by=outbox)) for name in fresh)
            for item in outbox.take(lambda item: item.name in fresh):  # newer than the refused
                self.held[item.name].items.append(item)
        for name, items in refused.items():
            hold = self.held[name]
            hold.items.extendleft(reversed(items))  # older than anything held
            hold.refused_by = outbox
        for hold in self.held.values():
            if hold.waiting is outbox:
                hold.waiting = None
        if refused:
            self.version += 1
        self._release(retry=False)
        return any(hold.waiting is None for hold in self.held.values())

    def relocate(self, outboxes: Iterable[Outbox]) -> None:
        """The slot map was read: call before any await, so frames published from now on
        queue behind the ones that were waiting for a channel's old owner."""
        for outbox in outboxes:
            for item in outbox.in_flight:
                if item.name not in self.held and self.route(item.name) is not outbox:
                    self.held[item.name] = Hold(waiting=outbox)
            for item in outbox.take(functools.partial(self._elsewhere, outbox)):
                hold = self.held.get(item.name)
                if hold is not None:
                    hold.items.append(item)
                else:
                    self._send([item], self.route(item.name))
        self.version += 1
        self._release(retry=True)

    def _elsewhere(self, outbox: Outbox, item: Outgoing) -> bool:
        return self.route(item.name) is not outbox

    def _release(self, *, retry: bool) -> None:
        """Send held channels on to their owner once nothing can come back from the old
        one; with ``retry``, also to the owner that refused (the map was just re-read)."""
        ready = [name for name, hold in self.held.items() if hold.waiting is None and (
            retry or self.route(name) is not hold.refused_by)]
        for name in ready:
            self._send(self.held.pop(name).items, self.route(name))
        if ready:
            self.version += 1

    def _send(self, items: Iterable[Outgoing], outbox: Outbox | None) -> None:
        if outbox is None:
            count = 0
            for item in items:
                fail(item, "no Redis Cluster node known for the channel")
                count += 1
            if count:
                self._failed(count, "%d frame(s) not sent to other nodes: no Redis Cluster "
                                    "node known for their channel")
            return
        for item in items:
            outbox.put(item)  # a full outbox counts what it drops

    def _failed(self, count: int, message: str) -> None:
        self.stats.publish_failures += count
        self.warn.warning(message, count, message)

    def close(self) -> None:
        """What is still held will not be sent: count it."""
        count = 0
        for hold in self.held.values():
            for item in hold.items:
                fail(item, "the broker closed")
                count += 1
        self.held.clear()
        if count:
            self.stats.publish_failures += count

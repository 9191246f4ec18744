"""What crosses nodes, behind one interface: frames published to channels, and presence.

A node tells the broker which channels it serves (``subscribe`` while it has local
subscribers, ``unsubscribe`` when the last one leaves) and publishes prepared frames
(:class:`echo.transport.base.Frame`). The broker hands every frame published to a channel
this node serves, by any node, to ``deliver`` exactly once and in each publisher's order:
the publishing node's own subscribers at once, other nodes' through the backend.

``memory`` (:mod:`echo.broker.memory`) is one node; ``redis`` (:mod:`echo.broker.redis`)
is any number of nodes on one Redis, several Redis servers (channels spread by consistent
hashing) or a Redis Cluster (sharded pub/sub).

History (:meth:`Broker.publish_history`, :meth:`Broker.history`): a channel with a history
policy gets positions, an ``offset`` counting up by one per message in one order for the
whole cluster and an ``epoch`` naming the stream's life, assigned where that order is
decided (in process, or by one Redis script that also stores and publishes the message), and
its last messages are kept for recovery. Idempotency keys
(:meth:`Broker.claim_idempotency`) make a retried publish a no-op cluster-wide.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from echo.transport.base import Frame

Deliver = Callable[[str, str, Frame], None]
"""``deliver(app, channel, frame)``: write a frame to this node's subscribers of a channel."""


@dataclass
class BrokerStats:
    """Counters /metrics exports; all monotonic."""

    published: int = 0
    """Frames this node published to other nodes."""
    received: int = 0
    """Frames received from other nodes and delivered here."""
    publish_failures: int = 0
    """Frames that could not be sent to other nodes (backend down, outbox full)."""
    lost_receivers: int = 0
    """Deliveries to other nodes known to be missed (fewer receivers than nodes serving)."""
    reconnects: int = 0
    """Times a lost backend connection was re-established and its channels re-subscribed."""
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much of a channel is kept: ``size`` messages, each for ``ttl`` seconds; the
    stream's position (offset, epoch) outlives its last message by ``meta_ttl`` seconds."""

    size: int
    ttl: float
    meta_ttl: float


@dataclass(frozen=True, slots=True)
class Position:
    """Where a stream is: the offset of its newest message (0: none yet) and its epoch."""

    offset: int
    epoch: str
    fresh: bool = False
    """The stream (and its epoch) began with this write: earlier data, if any, was lost."""


@dataclass(slots=True)
class HistoryRead:
    """Messages read from a stream, as delivered (each frame carries its ``offset``)."""

    position: Position
    frames: list[Frame]
    expired: bool = False
    """Some messages in the range asked for were older than the policy's ``ttl`` (left out)."""


def new_epoch() -> str:
    return secrets.token_hex(4)


def positioned(head: str, offset: int, epoch: str) -> str:
    """A history message's packet: ``head`` is everything up to its offset's digits
    (``2/app,["message",{...,"offset":``). The Redis script builds the same text."""
    return f'{head}{offset},"epoch":"{epoch}"}}]'


class Broker(abc.ABC):
    name: str
    remote = False
    """Its history and idempotency calls wait for another server (a publish then goes on
    in a task, so one connection's publishes don't queue behind those round trips)."""

    def __init__(self) -> None:
        self.stats = BrokerStats()
        self._deliver: Deliver | None = None

    @property
    def deliver(self) -> Deliver:
        assert self._deliver is not None, "Broker.start() first"
        return self._deliver

    async def start(self, deliver: Deliver) -> None:
        """Begin: frames for channels this node serves go to ``deliver`` from now on."""
        self._deliver = deliver

    @abc.abstractmethod
    def publish(self, app: str, channel: str, frame: Frame) -> None:
        """Deliver ``frame`` to the channel's subscribers on every node; never waits.

        This node's subscribers get it before this returns; other nodes in the order this
        node published. A frame that cannot reach other nodes is counted in ``stats``.
        """

    @abc.abstractmethod
    async def subscribe(self, app: str, channel: str) -> None:
        """This node now serves ``channel`` (its first local subscriber joined)."""

    @abc.abstractmethod
    async def unsubscribe(self, app: str, channel: str) -> None:
        """This node no longer serves ``channel`` (its last local subscriber left)."""

    @abc.abstractmethod
    async def presence_add(self, app: str, channel: str, member: str,
                           info: dict[str, Any]) -> None:
        """Record ``member`` (a connection, unique cluster-wide) as present in ``channel``."""

    @abc.abstractmethod
    async def presence_remove(self, app: str, channel: str, member: str) -> None:
        """Forget ``member`` in ``channel``."""

    @abc.abstractmethod
    async def presence(self, app: str, channel: str) -> dict[str, dict[str, Any]]:
        """Who is present in ``channel`` on every live node: ``{member: info}``; raises
        when the cluster cannot be asked (never a partial answer)."""

    @abc.abstractmethod
    def publish_history(self, app: str, channel: str, head: str,
                        policy: HistoryPolicy) -> asyncio.Future[Position]:
        """Give the message the channel's next offset, keep it, deliver it everywhere.

        ``head`` is the message's packet up to the offset (:func:`positioned` completes it).
        One atomic step: no node can die between numbering, storing and publishing. Every
        node's subscribers, this node's included, get channel messages in offset order. The
        future says where it went; it fails if the message reached no one.
        """

    @abc.abstractmethod
    async def history(self, app: str, channel: str, policy: HistoryPolicy, *,
                      since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryRead:
        """Kept messages with an offset above ``since`` (oldest first, or newest first with
        ``reverse``), at most ``limit``, and the stream's position (begun if it had none)."""

    @abc.abstractmethod
    async def claim_idempotency(self, app: str, channel: str, key: str,
                                window: float) -> dict[str, Any] | None:
        """None: ``key`` is new on this channel for ``window`` seconds, and now taken. Else
        what :meth:`settle_idempotency` recorded for it (``{}`` while the first is running)."""

    @abc.abstractmethod
    async def settle_idempotency(self, app: str, channel: str, key: str,
                                 ack: dict[str, Any] | None, window: float) -> None:
        """Record the first publish's ``ack`` for its key; None frees the key (it failed)."""

    @abc.abstractmethod
    async def occupancy_change(self, app: str, channel: str) -> bool | None:
        """After this node's latest presence change on ``channel``: True if it turned the
        channel, cluster-wide, from empty to occupied, False if from occupied to empty, None
        if neither. Decided atomically, so of several nodes changing it at once exactly one
        sees a turn (the ``channel_occupied`` / ``channel_vacated`` webhooks)."""

    @abc.abstractmethod
    async def occupied(self, app: str, limit: int) -> list[str]:
        """Up to ``limit`` channels of ``app`` with presence entries, on any node (sorted)."""

    # -- durable work queues (webhooks) -----------------------------------------------------

    @abc.abstractmethod
    async def enqueue(self, queue: str, items: list[bytes]) -> None:
        """Add ``items`` (unique byte strings), due now."""

    @abc.abstractmethod
    async def claim(self, queue: str, limit: int, lease: float) -> list[bytes]:
        """Up to ``limit`` due items, oldest first, made due again after ``lease`` seconds
        unless settled meanwhile: a claimer that dies leaves them to another."""

    @abc.abstractmethod
    async def settle(self, queue: str, item: bytes, again: bytes | None, delay: float) -> None:
        """``item`` is done; ``again`` (its retry) is due after ``delay`` seconds."""

    def history_entries(self) -> int | None:
        """Messages kept in history, when this process holds them (else None: in Redis)."""
        return None

    def describe(self) -> str:
        """What this broker is, for a log line (never a credential)."""
        return self.name

    async def problems(self) -> list[str]:
        """What keeps this broker from working now (for ``/ready``); empty when healthy."""
        return []

    async def flush(self) -> None:  # noqa: B027 - optional hook
        """Wait until what was published has left this node (callers bound the wait)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop: drop subscriptions, remove this node's presence entries."""

"""What crosses nodes, behind one interface: frames published to channels, and presence.

A node tells the broker which channels it serves (``subscribe`` while it has local
subscribers, ``unsubscribe`` when the last one leaves) and publishes prepared frames
(:class:`echo.transport.base.Frame`). The broker hands every frame published to a channel
this node serves, by any node, to ``deliver`` exactly once and in each publisher's order:
the publishing node's own subscribers at once, other nodes' through the backend.

``memory`` (:mod:`echo.broker.memory`) is one node; ``redis`` (:mod:`echo.broker.redis`)
is any number of nodes on one Redis, several Redis servers (channels spread by consistent
hashing) or a Redis Cluster (sharded pub/sub).
"""

from __future__ import annotations

import abc
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


class Broker(abc.ABC):
    name: str

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
        """Who is present in ``channel`` on every live node: ``{member: info}``."""

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

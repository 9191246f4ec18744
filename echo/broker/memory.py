"""One node, no backend: ``echoctl dev`` and a single ``echoctl serve`` without Redis."""

from __future__ import annotations

from typing import Any

from echo.broker.base import Broker
from echo.transport.base import Frame


class MemoryBroker(Broker):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._presence: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}

    def describe(self) -> str:
        return "memory (this node only)"

    def publish(self, app: str, channel: str, frame: Frame) -> None:
        self.deliver(app, channel, frame)

    async def subscribe(self, app: str, channel: str) -> None:
        return None  # every frame is local: nothing to subscribe to

    async def unsubscribe(self, app: str, channel: str) -> None:
        return None

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

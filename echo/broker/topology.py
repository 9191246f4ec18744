"""Which Redis Cluster primary owns which hash slots, as the cluster tells it.

Read with ``CLUSTER SHARDS`` (Redis >= 7, which sharded pub/sub needs anyway). redis-py
returns it as dicts in recent versions and as flat key/value lists in older ones; both are
read here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis

SLOTS = 16384


@dataclass(frozen=True)
class SlotRange:
    start: int
    end: int
    """Inclusive."""
    host: str
    port: int


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {_text(key): item for key, item in value.items()}
    items = iter(value)
    return {_text(key): item for key, item in zip(items, items, strict=False)}


def parse_shards(reply: Any, tls: bool = False) -> Iterator[SlotRange]:
    """The slot ranges of each shard's healthy primary in a ``CLUSTER SHARDS`` reply."""
    for shard in reply:
        fields = _fields(shard)
        primary = None
        for node in fields.get("nodes", []):
            node_fields = _fields(node)
            if _text(node_fields.get("role")) == "master" and \
                    _text(node_fields.get("health", "online")) == "online":
                primary = node_fields
        if primary is None:
            continue
        host = _text(primary.get("endpoint") or primary.get("ip"))
        if host in ("", "?"):
            host = _text(primary.get("ip"))
        port = primary.get("tls-port") if tls and primary.get("tls-port") else primary.get("port")
        slots = [int(bound) for bound in fields.get("slots", [])]
        for index in range(0, len(slots) - 1, 2):
            yield SlotRange(slots[index], slots[index + 1], host, int(_text(port)))


async def read_topology(url: str) -> list[SlotRange]:
    """Ask the cluster node at ``url`` who owns which slots."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        reply = await client.execute_command("CLUSTER SHARDS")  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
    return list(parse_shards(reply, tls=urlsplit(url).scheme == "rediss"))

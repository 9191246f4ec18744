"""Consistent hashing: which of several Redis servers carries a channel.

Each server owns many points (virtual nodes) on a 64-bit ring and a key belongs to the first
point at or after its hash, so adding a server moves only the keys that now fall on its
points (about 1/N of them) and every node that has the same server list computes the same
placement, whatever order the list is in.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

VIRTUAL_NODES = 160


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing(Generic[T]):
    """``members`` maps a stable identity (the server's URL, the same on every node) to what
    a key is routed to."""

    def __init__(self, members: Mapping[str, T], virtual_nodes: int = VIRTUAL_NODES) -> None:
        if not members:
            raise ValueError("a hash ring needs at least one member")
        points = sorted(
            (_point(f"{identity}#{index}".encode()), identity)
            for identity in members for index in range(virtual_nodes)
        )
        self._points = [point for point, _ in points]
        self._owners = [members[identity] for _, identity in points]

    def get(self, key: bytes) -> T:
        index = bisect.bisect_left(self._points, _point(key))
        return self._owners[index if index < len(self._owners) else 0]

"""Abuse limits per connection and per app: publish rate, connections per app on this node."""

from __future__ import annotations

import time


class TokenBucket:
    """Publish rate limit: ``rate`` tokens a second, up to ``burst`` saved up."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take one token; return 0 if granted, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class ConnectionCounts:
    """Open connections per app on this node, refused past ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.per_app: dict[str, int] = {}

    def problem(self, app: str) -> str | None:
        """Why one more connection to ``app`` is refused now, or None."""
        count = self.per_app.get(app, 0)
        if count < self.limit:
            return None
        return (f"limit: app {app[:80]!r} has {count} connections on this node, the limit is "
                f"{self.limit}; retry later or on another node")

    def add(self, app: str) -> None:
        self.per_app[app] = self.per_app.get(app, 0) + 1

    def remove(self, app: str) -> None:
        left = self.per_app.get(app, 0) - 1
        if left > 0:
            self.per_app[app] = left
        else:
            self.per_app.pop(app, None)

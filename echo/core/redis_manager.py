"""Cross-node delivery on Redis: python-socketio's Redis manager, made to survive Redis.

Changed from the stock ``AsyncRedisManager``: a bounded connection pool and the shared
reconnect policy of :mod:`echo.core.redis_conn` (the stock listener backs off up to 60 s).

Messages emitted while Redis is unreachable still reach this node's own clients (the
manager delivers locally before publishing); other nodes miss them. That loss is logged and
counted (``echo_redis_publish_failures_total``), never silent.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import socketio

from echo.core import metrics
from echo.core.broadcast import FastEmitMixin
from echo.core.redis_conn import SUBSCRIBED, redis_client, subscription

log = logging.getLogger("echo.redis")


class EchoRedisManager(socketio.AsyncRedisManager, FastEmitMixin):
    def __init__(self, url: str, channel: str = "echo:socketio") -> None:
        super().__init__(url=url, channel=channel)

    def _redis_connect(self) -> None:
        # one publishing client; its pool replaces dead connections by itself
        if self.redis is None:
            self.redis = redis_client(self.redis_url)
        self.connected = True

    async def _publish(self, data: Any) -> Any:
        try:
            self._redis_connect()
            return await self.redis.publish(self.channel, self.json.dumps(data))
        except Exception as exc:  # Redis down: this node's clients already have it
            metrics.REDIS_PUBLISH_FAILURES.inc()
            log.warning("not sent to other nodes (Redis unreachable: %s)", exc)
            return None

    async def _listen(self) -> AsyncIterator[Any]:
        async for message in subscription(self.redis_url, self.channel):
            if message is not SUBSCRIBED:
                yield message

"""Redis connections that survive Redis: a bounded client, and a subscription that never dies.

Both the Socket.IO manager (cross-node delivery) and the associations store (sync) use these,
so there is one reconnect policy: 0.1 s back-off doubling to 2 s, so service resumes within
seconds of Redis coming back, and a loop that never ends on its own (python-socketio #1581:
a listener that returned quietly left a node deaf for good).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from echo.core import metrics

log = logging.getLogger("echo.redis")

POOL_SIZE = 16
BACKOFF_START = 0.1
BACKOFF_MAX = 2.0

SUBSCRIBED = object()
"""Yielded by :func:`subscription` after every (re)subscription: time to catch up."""


def redis_client(url: str, *, retry: bool = True) -> aioredis.Redis:
    """A client whose pool is bounded (16) and waits for a free connection instead of failing.

    The stock unbounded pool opened 900-1,800 connections under concurrent publishes
    (shared/notes/performance.md); a dead connection is replaced on the next command.
    ``retry`` re-runs a command on a fresh connection after a drop; subscriptions turn it off
    (see :func:`subscription`).
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=5, socket_connect_timeout=2,
        health_check_interval=10,
        # after a Redis restart every pooled connection is dead: retry on a fresh one
        # instead of failing the first command on each
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3 if retry else 0),
        retry_on_error=[RedisConnectionError, RedisTimeoutError] if retry else [],
    )
    return aioredis.Redis(connection_pool=pool)


async def subscription(url: str, channel: str) -> AsyncIterator[Any]:
    """Yield messages published on ``channel`` forever, re-subscribing after any loss.

    Yields :data:`SUBSCRIBED` after each successful (re)subscription, then the ``data`` of
    each message. Only cancellation ends it.
    """
    backoff = BACKOFF_START
    first = True
    while True:
        # no transparent retry here: redis-py would silently reconnect and re-subscribe, and
        # a message published in that gap would be missed without SUBSCRIBED telling the
        # caller to catch up
        client = redis_client(url, retry=False)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if not first:
                metrics.REDIS_RECONNECTS.inc()
                log.info("re-subscribed to Redis channel %s", channel)
            first = False
            backoff = BACKOFF_START
            yield SUBSCRIBED
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield message["data"]
            log.warning("Redis subscription to %s ended; re-subscribing", channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("Redis unreachable (%s); retrying %s in %.1fs", exc, channel, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            for closing in (pubsub, client):
                try:
                    await closing.aclose()
                except Exception:  # the connection may already be gone
                    log.debug("closing a dead Redis connection failed", exc_info=True)

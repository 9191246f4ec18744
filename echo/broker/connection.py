"""Redis connections that survive Redis: bounded clients, and subscriptions that never die.

The broker (cross-node delivery) and the associations store (sync) use these, so there is
one reconnect policy: 0.1 s back-off doubling to 2 s, so service resumes within seconds of
Redis coming back, and loops that never end on their own (python-socketio #1581: a listener
that returned quietly left a node deaf for good).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("echo.redis")

POOL_SIZE = 16
BACKOFF_START = 0.1
BACKOFF_MAX = 2.0

SUBSCRIBED = object()
"""Yielded by :func:`subscription` after every (re)subscription: time to catch up."""


class Backoff:
    """Waits between reconnection attempts: 0.1 s, doubling up to 2 s, reset on success."""

    def __init__(self) -> None:
        self.delay = BACKOFF_START

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        return delay

    def reset(self) -> None:
        self.delay = BACKOFF_START


def redis_client(url: str, *, retry: bool = True,
                 socket_timeout: float | None = 5.0) -> aioredis.Redis:
    """A client whose pool is bounded (16) and waits for a free connection instead of failing.

    The stock unbounded pool opened 900-1,800 connections under concurrent publishes
    (shared/notes/performance.md); a dead connection is replaced on the next command.
    ``retry`` re-runs a command on a fresh connection after a drop; subscriptions turn it off
    (see :func:`subscription`). A command waits ``socket_timeout`` (5 s) at most: a frozen
    Redis (or a cut network that sends no reset) fails it instead of hanging its caller.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=5, socket_connect_timeout=2,
        socket_timeout=socket_timeout, socket_keepalive=True, health_check_interval=10,
        # after a Redis restart every pooled connection is dead: retry on a fresh one
        # instead of failing the first command on each
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3 if retry else 0),
        retry_on_error=[RedisConnectionError, RedisTimeoutError] if retry else [],
    )
    return aioredis.Redis(connection_pool=pool)


def subscriber_connection(url: str) -> AbstractConnection:
    """A fresh, unconnected connection for pub/sub that never reconnects by itself.

    RESP2 (subscription replies are plain arrays on every redis-py version), no retry and no
    health check of redis-py's own: the caller notices a loss, waits, reconnects and
    re-subscribes, so it always knows when it was deaf. No socket timeout either: a timer
    per read would cost more than the message; the caller watches for silence itself.
    """
    pool = aioredis.ConnectionPool.from_url(
        url, protocol=2, socket_connect_timeout=2, socket_timeout=None, socket_keepalive=True,
        health_check_interval=0, retry=Retry(NoBackoff(), 0), retry_on_error=[],
    )
    connection: AbstractConnection = pool.make_connection()  # type: ignore[no-untyped-call]
    return connection


def node_url(seed: str, host: str, port: int) -> str:
    """The URL of another node of the cluster ``seed`` belongs to: same scheme, credentials
    and options, another address."""
    parts = urlsplit(seed)
    auth = parts.netloc.rpartition("@")[0]
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit((parts.scheme, f"{auth}@{address}" if auth else address, "/0",
                       parts.query, ""))


def describe(url: str) -> str:
    """``host:port`` of a Redis URL, for logs and ``/ready``: never its password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


async def subscription(url: str, channel: str,
                       on_resubscribe: Callable[[], None] | None = None) -> AsyncIterator[Any]:
    """Yield messages published on ``channel`` forever, re-subscribing after any loss.

    Yields :data:`SUBSCRIBED` after each successful (re)subscription, then the ``data`` of
    each message; ``on_resubscribe`` is called after each re-subscription (not the first).
    Only cancellation ends it.
    """
    backoff = Backoff()
    first = True
    while True:
        # no transparent retry here: redis-py would silently reconnect and re-subscribe, and
        # a message published in that gap would be missed without SUBSCRIBED telling the
        # caller to catch up
        client = redis_client(url, retry=False, socket_timeout=None)  # idle is fine here
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            if not first:
                if on_resubscribe is not None:
                    on_resubscribe()
                log.info("re-subscribed to Redis channel %s", channel)
            first = False
            backoff.reset()
            yield SUBSCRIBED
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    yield message["data"]
            log.warning("Redis subscription to %s ended; re-subscribing", channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = backoff.next()
            log.warning("Redis unreachable (%s); retrying %s in %.1fs", exc, channel, delay)
            await asyncio.sleep(delay)
        finally:
            for closing in (pubsub, client):
                try:
                    await closing.aclose()
                except Exception:  # the connection may already be gone
                    log.debug("closing a dead Redis connection failed", exc_info=True)

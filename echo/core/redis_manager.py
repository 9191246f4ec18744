"""Cross-node delivery on Redis: python-socketio's Redis manager, made fast and survivable.

Changed from the stock ``AsyncRedisManager``:

* **Pipelined, ordered publishing.** The stock manager awaits a Redis round trip inside every
  emit, so each publish held its connection's reader until Redis answered, and concurrent
  publishes queued for pool connections (a connect storm overflowed the pool). Here an emit
  delivers to this node's subscribers, puts its message in an outbox and returns; one task
  sends the outbox to Redis as a pipeline, whatever gathered while the previous one was in
  flight. One sender also keeps this node's messages in order on the wire.
* **No decoding of its own messages.** Every node receives what it published; the stock
  listener decoded each one just to find its own ``host_id``. Messages are framed as
  ``<host_id>:<json>``, so a node skips its own by a prefix check. (Nodes of an older Echo,
  which sent bare JSON, do not understand this framing: upgrade a cluster's nodes together.)
* A bounded connection pool and the shared reconnect policy of :mod:`echo.core.redis_conn`
  (the stock listener backs off up to 60 s).

Messages emitted while Redis is unreachable still reach this node's own clients; other nodes
miss them. That loss is logged and counted (``echo_redis_publish_failures_total``), never
silent; so is a message dropped because the outbox is full (Redis too slow or down).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import socketio

from echo.core import codec, metrics
from echo.core.broadcast import FastEmitMixin
from echo.core.redis_conn import SUBSCRIBED, redis_client, subscription

log = logging.getLogger("echo.redis")

MAX_OUTBOX = 10_000
"""Messages waiting for Redis beyond which new ones are dropped (and counted)."""


class EchoRedisManager(socketio.AsyncRedisManager, FastEmitMixin):
    def __init__(self, url: str, channel: str = "echo:socketio") -> None:
        super().__init__(url=url, channel=channel)
        self._own_prefix = self.host_id.encode() + b":"
        self._outbox: list[bytes] = []
        self._sender: asyncio.Task[None] | None = None
        self._last_overflow_log = 0.0

    def _redis_connect(self) -> None:
        # one publishing client; its pool replaces dead connections by itself
        if self.redis is None:
            self.redis = redis_client(self.redis_url)
        self.connected = True

    async def emit(self, event: str, data: Any, namespace: str | None = None, room: Any = None,
                   skip_sid: Any = None, callback: Any = None, to: Any = None,
                   **kwargs: Any) -> None:
        room = to or room
        if callback is not None or kwargs.get("ignore_queue"):
            return await super().emit(event, data, namespace=namespace, room=room,
                                      skip_sid=skip_sid, callback=callback, **kwargs)
        namespace = namespace or "/"
        message = {
            "method": "emit", "event": event,
            "data": list(data) if isinstance(data, tuple) else [data],
            "binary": False, "namespace": namespace, "room": room, "skip_sid": skip_sid,
            "callback": None, "host_id": self.host_id,
        }
        try:
            text = codec.dumps(message)
        except TypeError:  # bytes in the data: python-socketio's path encodes attachments
            return await super().emit(event, data, namespace=namespace, room=room,
                                      skip_sid=skip_sid, **kwargs)
        await FastEmitMixin.emit(self, event, data, namespace, room=room, skip_sid=skip_sid)
        self._send(text)
        return None

    async def _publish(self, data: Any) -> None:
        self._send(codec.dumps(data))

    def _send(self, text: str) -> None:
        if len(self._outbox) >= MAX_OUTBOX:
            metrics.REDIS_PUBLISH_FAILURES.inc()
            now = time.monotonic()
            if now - self._last_overflow_log > 1:
                self._last_overflow_log = now
                log.warning("not sent to other nodes: %d messages already wait for Redis",
                            MAX_OUTBOX)
            return
        self._outbox.append(self._own_prefix + text.encode())
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_outbox())

    async def _send_outbox(self) -> None:
        try:
            while self._outbox:
                batch, self._outbox = self._outbox, []
                try:
                    self._redis_connect()
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for message in batch:
                            pipe.publish(self.channel, message)
                        await pipe.execute()
                except Exception as exc:  # Redis down: this node's clients already have them
                    metrics.REDIS_PUBLISH_FAILURES.inc(len(batch))
                    log.warning("%d message(s) not sent to other nodes (Redis unreachable: %s)",
                                len(batch), exc)
        finally:
            self._sender = None

    async def flush(self) -> None:
        """Wait until the outbox is sent: before shutting down."""
        if self._sender is not None:
            await asyncio.wait([self._sender])

    async def _listen(self) -> AsyncIterator[Any]:
        own = self._own_prefix
        async for message in subscription(self.redis_url, self.channel):
            if message is SUBSCRIBED or message.startswith(own):
                continue
            sender_end = message.find(b":")
            try:
                yield codec.loads(message[sender_end + 1:])
            except ValueError:
                log.warning("ignored a malformed message on Redis channel %s", self.channel)

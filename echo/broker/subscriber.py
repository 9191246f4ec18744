"""One pub/sub connection to one Redis server, with channels added and removed as it runs.

A node keeps one per server it has channels on (not one per channel). ``add`` and ``remove``
change what it wants; while connected it subscribes at once and waits for Redis to confirm.
After any loss (Redis restarted, connection cut, no answer to a PING) it waits (0.1 s
doubling to 2 s), reconnects, lets the broker ``prepare`` (re-register this node's interest
before subscribing, so a frame published in between is counted as missed), re-subscribes
everything it wants and counts a reconnect. It never ends on its own.

With ``sharded`` it speaks sharded pub/sub (``SSUBSCRIBE``, Redis Cluster): a channel whose
slot moved away is unsubscribed by the server, and ``on_lost`` sends the broker to find the
new owner.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import MovedError, ResponseError

from echo.broker.base import BrokerStats
from echo.broker.connection import Backoff, subscriber_connection
from echo.broker.throttle import ThrottledLog

log = logging.getLogger("echo.redis")

IDLE = 5.0
"""Seconds without a word from Redis after which a PING is sent; as long again without an
answer and the connection is given up as dead."""
CONFIRM_TIMEOUT = 5.0
"""Seconds ``add``/``remove`` wait for Redis to confirm."""
CONNECT_TIMEOUT = 10.0
"""Seconds to connect, re-register and send every subscription before trying again."""
CHUNK = 256
"""Channels per (S)SUBSCRIBE command when re-subscribing many."""


class Subscriber:
    def __init__(self, url: str, label: str, *, sharded: bool, stats: BrokerStats,
                 warn: ThrottledLog,
                 on_message: Callable[[bytes, bytes], None],
                 prepare: Callable[[Subscriber], Awaitable[None]],
                 on_lost: Callable[[Subscriber, int | None], None] | None = None) -> None:
        self.url = url
        self.label = label
        self.sharded = sharded
        self.stats = stats
        self.warn = warn
        self.on_message = on_message
        self.prepare = prepare
        self.on_lost = on_lost
        prefix = b"s" if sharded else b""
        self._message = prefix + b"message"
        self._subscribe = prefix + b"subscribe"
        self._unsubscribe = prefix + b"unsubscribe"
        self.wanted: set[bytes] = set()
        """Channels this node wants from this server (whether or not connected now)."""
        self.live = False
        """Connected, and every wanted channel's subscription sent."""
        self._conn: AbstractConnection | None = None
        self._sent: set[bytes] = set()  # (S)SUBSCRIBE sent on the current connection
        self._confirmed: set[bytes] = set()  # ... and confirmed by Redis
        self._leaving: set[bytes] = set()  # (S)UNSUBSCRIBE sent, not confirmed
        self._waiters: dict[tuple[bytes, bytes], list[asyncio.Future[bool]]] = defaultdict(list)
        self._replies = 0
        self._task: asyncio.Task[None] | None = None
        self._attempt: asyncio.Future[None] | None = None  # a connection attempt under way

    def start(self) -> None:
        if self._task is None:
            self._attempt = asyncio.get_running_loop().create_future()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def add(self, name: bytes) -> bool:
        """Want ``name``; True once Redis confirmed the subscription. False if Redis is not
        reachable now: it is subscribed as soon as the connection is back."""
        self.wanted.add(name)
        self.start()
        if not self.live and self._attempt is not None:  # connecting: wait for the outcome
            try:
                await asyncio.wait_for(asyncio.shield(self._attempt), CONFIRM_TIMEOUT)
            except TimeoutError:
                return False
        if not self.live or name not in self.wanted:
            return False
        if name in self._confirmed:
            return True
        return await self._command(self._subscribe, name, send=name not in self._sent)

    async def remove(self, name: bytes) -> None:
        """Stop wanting ``name``; returns once Redis confirmed (or the connection is gone)."""
        self.wanted.discard(name)
        if self.live and name in self._sent:
            self._sent.discard(name)
            self._confirmed.discard(name)
            self._leaving.add(name)
            await self._command(self._unsubscribe, name)

    async def resync(self) -> None:
        """Subscribe what is wanted and not subscribed (after the server dropped some)."""
        if self.live and self._conn is not None:
            await self._reconcile(self._conn)

    async def _command(self, kind: bytes, name: bytes, send: bool = True) -> bool:
        """Send ``kind name`` (unless already sent) and wait for Redis to confirm it."""
        conn = self._conn
        if conn is None:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[(kind, name)].append(waiter)
        try:
            if send:
                if kind == self._subscribe:
                    self._sent.add(name)
                await conn.send_command(kind.decode(), name)
            return await asyncio.wait_for(asyncio.shield(waiter), CONFIRM_TIMEOUT)
        except Exception as exc:  # the connection broke, or Redis did not answer in time
            log.debug("%s %r on Redis %s not confirmed: %s", kind, name[:120], self.label, exc)
            return False
        finally:
            waiting = self._waiters.get((kind, name))
            if waiting is not None and waiter in waiting:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiters[(kind, name)]

    def _confirm(self, kind: bytes, name: bytes, result: bool) -> None:
        for waiter in self._waiters.pop((kind, name), []):
            if not waiter.done():
                waiter.set_result(result)

    async def _run(self) -> None:
        backoff = Backoff()
        first = True
        while True:
            if self._attempt is None or self._attempt.done():
                self._attempt = asyncio.get_running_loop().create_future()
            conn = subscriber_connection(self.url)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):  # a frozen Redis accepts, then hangs
                    await conn.connect()  # type: ignore[no-untyped-call]
                    await self.prepare(self)
                    self._conn = conn
                    self._sent = set()
                    self._confirmed = set()
                    self._leaving = set()
                    await self._reconcile(conn)
                self._attempt.set_result(None)
                if not first:
                    self.stats.reconnects += 1
                    log.info("re-subscribed %d channel(s) on Redis %s", len(self.wanted),
                             self.label)
                first = False
                backoff.reset()
                await self._listen(conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.live:
                    log.warning("Redis %s: subscriptions lost (%s); reconnecting", self.label,
                                exc or type(exc).__name__)
            finally:
                self.live = False
                self._conn = None
                if not self._attempt.done():
                    self._attempt.set_result(None)
                self._attempt = None
                for (_kind, _name), waiting in list(self._waiters.items()):
                    for waiter in waiting:
                        if not waiter.done():
                            waiter.set_result(False)
                try:
                    await conn.disconnect(nowait=True)
                except Exception:  # already gone
                    log.debug("closing a dead Redis connection failed", exc_info=True)
            delay = backoff.next()
            self.warn.warning(f"down {self.label}", 1, "%d attempt(s) to subscribe on Redis %s "
                              "failed; retrying in %.1fs", self.label, delay)
            await asyncio.sleep(delay)

    async def _reconcile(self, conn: AbstractConnection) -> None:
        """Make the connection's subscriptions what is wanted, then mark it live. Loops
        because ``wanted`` may change while commands are sent."""
        while True:
            joining = self.wanted - self._sent
            leaving = self._sent - self.wanted
            if not joining and not leaving:
                self.live = True
                return
            self._sent |= joining
            self._sent -= leaving
            self._leaving |= leaving
            for kind, names in ((self._subscribe, joining), (self._unsubscribe, leaving)):
                for group in self._groups(names):
                    await conn.send_command(kind.decode(), *group)

    def _groups(self, names: Iterable[bytes]) -> Iterable[list[bytes]]:
        """Chunks of channels one command may carry: in one slot each when sharded."""
        if not self.sharded:
            ordered = sorted(names)
            return (ordered[i:i + CHUNK] for i in range(0, len(ordered), CHUNK))
        slots: dict[int, list[bytes]] = defaultdict(list)
        for name in names:
            slots[key_slot(name)].append(name)
        return (group[i:i + CHUNK] for group in slots.values()
                for i in range(0, len(group), CHUNK))

    async def _listen(self, conn: AbstractConnection) -> None:
        # reads carry no timeout (a timer per message would cost more than the message):
        # the watchdog pings an idle connection and cuts one that stopped answering
        watchdog = asyncio.get_running_loop().create_task(self._watch(conn))
        message = self._message
        try:
            while True:
                try:
                    reply = await conn.read_response()
                except MovedError as exc:  # SSUBSCRIBE to a node that no longer owns the slot
                    self._dropped_slot(exc.slot_id)
                    continue
                except ResponseError as exc:
                    log.warning("Redis %s refused a subscription: %s", self.label, exc)
                    continue
                self._replies += 1
                if reply[0] == message:
                    self.on_message(reply[1], reply[2])
                else:
                    self._handle(reply)
        finally:
            watchdog.cancel()
            await asyncio.gather(watchdog, return_exceptions=True)

    async def _watch(self, conn: AbstractConnection) -> None:
        loop = asyncio.get_running_loop()
        heard, heard_at = self._replies, loop.time()
        pinged_at: float | None = None
        while True:
            await asyncio.sleep(IDLE / 5)
            now = loop.time()
            if self._replies != heard:
                heard, heard_at, pinged_at = self._replies, now, None
            elif pinged_at is None and now - heard_at >= IDLE:
                try:
                    await asyncio.wait_for(conn.send_command("PING"), IDLE)
                except Exception as exc:
                    log.warning("Redis %s: PING failed (%s)", self.label, exc)
                    break
                pinged_at = now
            elif pinged_at is not None and now - pinged_at >= IDLE:
                log.warning("Redis %s: no answer to PING within %.0fs", self.label, IDLE)
                break
        try:
            await conn.disconnect(nowait=True)  # the listener's read fails: it reconnects
        except Exception as exc:  # its listener gathers this task and would not tell
            log.warning("Redis %s: closing a silent connection failed (%s)", self.label,
                        exc or type(exc).__name__)

    def _handle(self, reply: list[bytes]) -> None:
        """A subscription's confirmation, or the server dropping one."""
        kind = reply[0]
        if kind == self._subscribe:
            self._confirmed.add(reply[1])
            self._confirm(kind, reply[1], True)
        elif kind == self._unsubscribe:
            name = reply[1]
            self._confirmed.discard(name)
            if name in self._leaving:
                self._leaving.discard(name)
                self._confirm(kind, name, True)
            elif name in self._sent:  # the server dropped it: its slot moved
                self._sent.discard(name)
                if self.on_lost is not None:
                    self.on_lost(self, key_slot(name))

    def _dropped_slot(self, slot: int) -> None:
        for name in [name for name in self._sent if key_slot(name) == slot]:
            self._sent.discard(name)
            self._confirmed.discard(name)
            self._confirm(self._subscribe, name, False)
        if self.on_lost is not None:
            self.on_lost(self, slot)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

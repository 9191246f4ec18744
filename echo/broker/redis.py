"""Cross-node delivery on Redis: per-channel subscriptions, sharded over servers or a Cluster.

**Who gets what.** A node subscribes to a channel's Redis channel only while it serves the
channel, on one pub/sub connection per Redis server (:mod:`echo.broker.subscriber`), so it
receives nothing for channels it doesn't serve. A channel's Redis names carry a hash tag,
``<prefix>:{<app>:<channel>}`` (the app percent-encoded, so no ``:``, ``{`` or ``}`` of a
name can make two channels collide), and every key of the channel (``…:nodes``,
``…:presence``, history later) lives in the same Cluster slot or on the same server.

**Where.** One URL: one server. Several: each channel on one of them by consistent hashing
of the hash tag (:mod:`echo.broker.ring`; every node must list the same URLs). A Cluster
(``cluster=True``, the URLs are seed nodes): the slot owner, read from ``CLUSTER SHARDS``,
through sharded pub/sub (``SPUBLISH``/``SSUBSCRIBE``); a slot that moves is re-resolved
(``MOVED``, or a server-sent ``sunsubscribe``) and its channels re-subscribed.

**What travels.** ``<node id: 16 bytes><epoch: 4><sequence: 8><Frame.packet>``: the
receiving node skips its own frames by the prefix and writes the packet as it is. The
sequence (per publishing node and channel) lets a receiver see frames it missed, and drop a
frame it already has (a pipeline resent after a connection broke mid-way). A channel's
frames keep their order while its Cluster slot moves (:mod:`echo.broker.moves`).

**Loss is counted, never silent.** ``publish`` delivers locally, then queues for Redis
(:mod:`echo.broker.outbox`: ordered, pipelined, bounded); a frame that can't be sent counts
in ``stats.publish_failures``. Each node registers its interest in a channel in
``<name>:nodes`` (score: expiry in Redis time, refreshed every ``liveness / 3`` s) once its
subscription is confirmed, and again *before* re-subscribing after a reconnect; the publish
script returns PUBLISH's receiver count and the count of live registrations, and the
difference goes to ``stats.lost_receivers`` (the publisher's view). The receiver's view is
``missed_frames`` (in ``stats.extra``): sequence gaps, which also catch what the registry
cannot see (a restarted Redis lost the registry, and a node had not re-registered yet).

**Presence** is a hash per channel (``member -> <node id><info JSON>``) beside a registry of
the nodes holding entries there. This node's writes go through a queue per server
(:mod:`echo.broker.presence_writes`: pipelined, ordered, bounded), so ``presence_add`` and
``presence_remove`` return at once; ``presence()`` answers this node's own members from its
own record and the other live nodes' from Redis, deleting the entries of nodes whose
registration expired, so a dead node's entries go within ``liveness`` (30 s) seconds; with
Redis unreachable it raises rather than answer with this node's members only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import struct
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, TryAgainError

from echo.broker.base import (
    Broker,
    BrokerStats,
    Deliver,
    HistoryPolicy,
    HistoryRead,
    Position,
    new_epoch,
)
from echo.broker.connection import describe, node_url, redis_client
from echo.broker.moves import SlotMoves
from echo.broker.outbox import HistoryWrite, Outbox, Outgoing
from echo.broker.presence_writes import PresenceWrite, PresenceWrites
from echo.broker.ring import HashRing
from echo.broker.scripts import (
    OCCUPANCY,
    PRESENCE_ADD,
    PRESENCE_BEAT,
    PRESENCE_PAIRS,
    PRESENCE_READ,
    PRESENCE_REMOVE,
    PUBLISH,
    PUBLISH_HISTORY,
    QUEUE_ADD,
    QUEUE_CLAIM,
    QUEUE_SETTLE,
    READ_HISTORY,
    REGISTER,
    SPUBLISH,
    SPUBLISH_HISTORY,
    Call,
    run_pipelined,
    run_script,
)
from echo.broker.subscriber import Subscriber
from echo.broker.throttle import ThrottledLog
from echo.broker.topology import SLOTS, read_topology
from echo.transport import codec
from echo.transport.base import Frame

if TYPE_CHECKING:
    from echo.config import Settings

log = logging.getLogger("echo.redis")

T = TypeVar("T")

NODE_ID_BYTES = 16
HEADER = struct.Struct(">16sIQ")
"""Node id, epoch (a new one when the publisher forgot its sequences), sequence."""
MAX_QUEUED = 100_000
"""Items a work queue holds at most (webhooks of a receiver that is down)."""
PENDING_CLAIM_SECONDS = 30.0
"""How long an idempotency key stays claimed by a publish that has not settled it (a node
that died mid-publish frees it then, not after the whole window)."""
HISTORY_FLAG = 0x8000_0000
"""Set in the header's epoch for a history message: its offset follows the header (digits,
then ``|``) and every serving node delivers it, the publisher's own included."""
PREFIX_BYTES = HEADER.size
LIVENESS = 30.0
"""Seconds a node's registration (interest, presence) lives without a refresh."""
MAX_SEQUENCES = 100_000
"""Channels a publisher keeps a sequence (and its route) for; beyond, it starts a new epoch."""
MAX_SENDERS = 256
"""Publishers a receiver tracks per channel; beyond, it forgets them (no gap counted)."""
TOPOLOGY_INTERVAL = 0.5
"""At most one ``CLUSTER SHARDS`` per this many seconds, however many MOVED arrive."""
REGISTER_KEYS = 500
"""Registries refreshed by one script call (when their channels share a server or slot)."""
COMMAND_TIMEOUT = 2.0
"""Seconds a bookkeeping command (unregister, clean-up) may take before it is given up."""
CHANNEL_SAFE = "-_:.@=/#~"
"""Characters kept as they are in a channel's part of a Redis name (Echo's channel names
and the ``#presence`` suffix); anything else is percent-encoded."""


class ChannelKeys(NamedTuple):
    name: bytes
    """The Redis (shard) channel."""
    nodes: bytes
    """Sorted set: nodes serving the channel (score: expiry, ms of Redis time)."""
    presence: bytes
    """Hash: member -> node id + info JSON."""
    present: bytes
    """Sorted set: nodes holding presence entries in the channel."""
    history: bytes
    """Stream: the channel's kept messages (entry id ``0-<offset>``)."""
    position: bytes
    """Hash: the history stream's epoch (``e``) and last offset (``o``)."""
    occupancy: bytes
    """Hash: node id -> its subscribed connections (for the occupancy webhooks)."""

    @classmethod
    def of(cls, name: bytes) -> ChannelKeys:
        """The keys of the channel whose Redis channel is ``name``."""
        return cls(name, name + b":nodes", name + b":presence", name + b":present",
                   name + b":history", name + b":position", name + b":occupancy")

    def idempotency(self, key: str) -> bytes:
        """String: what the first publish with ``key`` was answered."""
        return self.name + b":idem:" + quote(key, safe="").encode()


@functools.lru_cache(maxsize=65_536)
def channel_keys(prefix: str, app: str, channel: str) -> ChannelKeys:
    name = f"{prefix}:{{{quote(app, safe='')}:{quote(channel, safe=CHANNEL_SAFE)}}}".encode()
    return ChannelKeys.of(name)


def glob_escape(text: str) -> str:
    """``text`` matched literally in a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def hash_tag(key: bytes) -> bytes:
    """What Redis Cluster hashes: the text between the first ``{`` and the next ``}``."""
    start = key.find(b"{")
    end = key.find(b"}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else key


class Shard:
    """One Redis server this node uses: a bounded command client, an outbox of frames, a
    queue of presence writes, a subscriber."""

    def __init__(self, url: str, broker: RedisBroker) -> None:
        self.url = url
        self.label = describe(url)
        self.client = redis_client(url)
        stats = broker.stats
        self.outbox = Outbox(self.client, self.label, broker.publish_script, stats, broker.warn,
                             on_settled=broker.settled if broker.cluster else None,
                             history_script=broker.history_script)
        self.presence = PresenceWrites(self.client, self.label, broker.presence_failed)
        self.subscriber = Subscriber(url, self.label, sharded=broker.cluster, stats=stats,
                                     warn=broker.warn, on_message=broker.received,
                                     prepare=broker.prepare, on_lost=broker.lost)

    @property
    def idle(self) -> bool:
        """Nothing to send and no channel wanted here: the shard may go."""
        return not (self.outbox.busy or self.presence.busy or self.subscriber.wanted)

    async def close(self) -> None:
        await self.outbox.close()
        await self.presence.close()
        await self.subscriber.close()
        await self.client.aclose()
        await self.client.connection_pool.disconnect()  # a pool given to a client stays open


@dataclass
class _Turn:
    lock: asyncio.Lock
    users: int = 0


class Publishing:
    """What ``publish`` keeps per channel, so a frame costs no hashing: the channel's names,
    its sequence, and its outbox (good while ``version`` is the slot map's)."""

    __slots__ = ("keys", "outbox", "sequence", "version")

    def __init__(self, keys: ChannelKeys) -> None:
        self.keys = keys
        self.sequence = 0
        self.outbox: Outbox | None = None
        self.version = -1


class RedisBroker(Broker):
    name = "redis"
    remote = True

    def __init__(self, urls: list[str], *, cluster: bool = False, prefix: str = "echo",
                 liveness: float = LIVENESS) -> None:
        super().__init__()
        if not urls:
            raise ValueError("RedisBroker needs at least one Redis URL")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r} must not contain braces (hash tags)")
        self.urls = list(urls)
        self.cluster = cluster
        self.prefix = prefix
        self.liveness = liveness
        self.node_id = secrets.token_hex(NODE_ID_BYTES // 2).encode()
        self.publish_script = SPUBLISH if cluster else PUBLISH
        self.history_script = SPUBLISH_HISTORY if cluster else PUBLISH_HISTORY
        self.history_gaps = 0
        """History messages from Redis missing in a channel's offsets (pub/sub lost them)."""
        self._offsets: dict[bytes, int] = {}
        """The last offset delivered here per history channel (gap counting)."""
        self.warn = ThrottledLog(log)
        self.missed_frames = 0
        """Frames from other nodes known to be missed (gaps in their sequences)."""
        self.duplicates_dropped = 0
        """Frames from other nodes dropped because they were delivered already."""
        self.presence_failures = 0
        """Presence writes and reads that did not reach Redis."""
        self._moves = SlotMoves(self._outbox_of, self._stats, self.warn)
        self._local: Deliver = self._not_started
        """``deliver`` without the property's check, for the per-frame paths."""
        self._shards: dict[str, Shard] = {}
        self._ring: HashRing[Shard] | None = None
        self._slots: list[Shard | None] = [None] * SLOTS
        if not cluster:
            self._shards = {url: Shard(url, self) for url in self.urls}
            self._ring = HashRing(self._shards)
        self._served: dict[bytes, tuple[str, str]] = {}
        self._assigned: dict[bytes, Shard] = {}
        self._seen: dict[bytes, dict[bytes, tuple[int, int]]] = {}
        self._publishing: dict[str, dict[str, Publishing]] = {}
        self._publishing_count = 0
        self._epoch = 1
        self._present: dict[ChannelKeys, dict[str, bytes]] = {}
        self._unsynced: set[ChannelKeys] = set()
        self._turns: dict[bytes, _Turn] = {}
        self._topology_lock = asyncio.Lock()
        self._topology_at = -TOPOLOGY_INTERVAL
        self._topology_known = False
        self._topology_asked = False  # a re-read is on its way and has not started reading
        self._repairing = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._maintainer: asyncio.Task[None] | None = None

    @staticmethod
    def _not_started(app: str, channel: str, frame: Frame) -> None:
        raise RuntimeError("RedisBroker.start() first")

    @property
    def stats(self) -> BrokerStats:
        """The counters; ``extra`` (this backend's own) is filled in as it is read, so the
        paths that count them pay for a plain attribute only."""
        stats = self._stats
        stats.extra.update(missed_frames=self.missed_frames,
                           duplicates_dropped=self.duplicates_dropped,
                           presence_failures=self.presence_failures,
                           history_gaps=self.history_gaps)
        return stats

    @stats.setter
    def stats(self, stats: BrokerStats) -> None:
        self._stats = stats

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisBroker:
        from echo.config import redis_urls

        if not settings.redis_url:
            raise ValueError("redis_url is not set")
        return cls(redis_urls(settings.redis_url), cluster=settings.redis_cluster,
                   liveness=settings.node_liveness)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, deliver: Callable[[str, str, Frame], None]) -> None:
        await super().start(deliver)
        self._local = deliver
        if self.cluster and not await self._refresh_topology():
            log.warning("Redis Cluster: no seed node answered (%s); retrying every second",
                        ", ".join(describe(url) for url in self.urls))
        self._maintainer = asyncio.get_running_loop().create_task(self._maintain())

    async def flush(self) -> None:
        """Wait until frames (including those held while their slot moves) and presence
        writes have left this node."""
        while True:
            for shard in list(self._shards.values()):
                await shard.outbox.flush()
                await shard.presence.flush()
            if not self._moves.held and not any(
                    shard.outbox.busy or shard.presence.busy for shard in self._shards.values()):
                return
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        tasks = [task for task in (self._maintainer, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._leave(), COMMAND_TIMEOUT)
        except Exception as exc:
            log.warning("could not remove this node's registrations and presence from Redis "
                        "(%s); they expire within %.0fs", exc or type(exc).__name__,
                        self.liveness)
        self._moves.close()
        for shard in list(self._shards.values()):
            await shard.close()

    async def _leave(self) -> None:
        """Delete this node's registrations and presence entries (after the presence writes
        still queued, which would otherwise put some back)."""
        await asyncio.gather(*(shard.presence.flush() for shard in list(self._shards.values())))
        work: dict[Shard, list[tuple[str, tuple[Any, ...]]]] = {}
        for name, shard in self._assigned.items():
            work.setdefault(shard, []).append(("zrem", (name + b":nodes", self.node_id)))
        for keys, members in self._present.items():
            owner = self._route(keys.name)
            if owner is not None and members:
                work.setdefault(owner, []).extend([("hdel", (keys.presence, *members)),
                                                   ("zrem", (keys.present, self.node_id))])

        async def clean(shard: Shard, commands: list[tuple[str, tuple[Any, ...]]]) -> None:
            async with shard.client.pipeline(transaction=False) as pipe:
                for command, args in commands:
                    getattr(pipe, command)(*args)
                await pipe.execute(raise_on_error=False)

        await asyncio.gather(*(clean(shard, commands) for shard, commands in work.items()))

    def describe(self) -> str:
        servers = ", ".join(describe(url) for url in self.urls)  # host:port, no credentials
        return f"redis cluster (seeds {servers})" if self.cluster else f"redis ({servers})"

    async def problems(self) -> list[str]:
        found: list[str] = []
        if self.cluster and not self._topology_known:
            found.append("redis cluster: slot owners unknown (no seed node answered: "
                         + ", ".join(describe(url) for url in self.urls) + ")")

        async def check(shard: Shard) -> None:
            try:
                await asyncio.wait_for(shard.client.ping(), 1)
            except Exception as exc:
                found.append(f"redis {shard.label}: unreachable ({exc or type(exc).__name__})")
                return
            if shard.subscriber.wanted and not shard.subscriber.live:
                found.append(f"redis {shard.label}: re-subscribing "
                             f"{len(shard.subscriber.wanted)} channel(s)")

        await asyncio.gather(*(check(shard) for shard in list(self._shards.values())))
        return found

    # -- routing ---------------------------------------------------------------------------

    def _route(self, key: bytes) -> Shard | None:
        if self._ring is not None:
            return self._ring.get(hash_tag(key))
        return self._slots[key_slot(key)]

    def _outbox_of(self, key: bytes) -> Outbox | None:
        shard = self._route(key)
        return shard.outbox if shard is not None else None

    def shard_of(self, app: str, channel: str) -> str | None:
        """``host:port`` of the Redis server carrying ``channel`` (for tests and logs)."""
        shard = self._route(channel_keys(self.prefix, app, channel).name)
        return shard.label if shard is not None else None

    async def _refresh_topology(self) -> bool:
        """Read the slot owners from the cluster and move channels whose owner changed.

        However many callers ask at once (every MOVED frame of a batch), one read serves
        all who asked before it started, and reads are at least ``TOPOLOGY_INTERVAL`` apart.
        """
        asked = time.monotonic()
        async with self._topology_lock:
            if self._topology_at >= asked:
                return self._topology_known
            await asyncio.sleep(self._topology_at + TOPOLOGY_INTERVAL - time.monotonic())
            self._topology_at = time.monotonic()
            self._topology_asked = False
            ranges = None
            for url in [*self._shards, *self.urls]:
                try:
                    ranges = await read_topology(url)
                    break
                except Exception as exc:
                    log.debug("CLUSTER SHARDS on %s failed: %s", describe(url), exc)
            if not ranges:
                self._moves.relocate(shard.outbox for shard in list(self._shards.values()))
                return False
            slots: list[Shard | None] = [None] * SLOTS
            for owner in ranges:
                url = node_url(self.urls[0], owner.host, owner.port)
                shard = self._shards.get(url)
                if shard is None:
                    shard = self._shards[url] = Shard(url, self)
                slots[owner.start:owner.end + 1] = [shard] * (owner.end - owner.start + 1)
            self._slots = slots
            self._topology_known = True
            # before any await: queued frames of channels that moved go ahead of new ones
            self._moves.relocate(shard.outbox for shard in list(self._shards.values()))
        await self._reroute()
        return True

    def _refresh_topology_soon(self) -> None:
        """Re-read the slot map (unless a re-read that has not started reading is queued)."""
        if self._topology_asked:
            return
        self._topology_asked = True

        async def refresh() -> None:
            await self._refresh_topology()

        self._spawn(refresh())

    async def _reroute(self) -> None:
        moving = [name for name in self._served
                  if self._assigned.get(name) is not self._route(name)]
        for name in moving:
            async with self._turn(name):
                old = self._assigned.get(name)
                new = self._route(name)
                if name not in self._served or old is new:
                    continue
                if old is not None:
                    del self._assigned[name]
                    await old.subscriber.remove(name)
                if new is not None:
                    await self._attach(name, new, register_first=True)
        owning = set(self._slots)
        for url, shard in list(self._shards.items()):
            if shard in owning:
                await shard.subscriber.resync()
            elif shard.idle:
                del self._shards[url]
                await shard.close()

    def settled(self, outbox: Outbox, moved: list[Outgoing]) -> None:
        """A pipeline of frames is over; ``moved`` were redirected (MOVED, ASK, TRYAGAIN:
        their slot moved or is moving): they wait, with what their channels publish next,
        until the slot map is re-read (:mod:`echo.broker.moves`)."""
        if self._moves.settled(outbox, moved):
            self._refresh_topology_soon()

    def lost(self, subscriber: Subscriber, slot: int | None) -> None:
        """The server dropped subscriptions (their slot moved): re-resolve, re-subscribe."""
        log.info("Redis %s no longer serves slot %s; finding its new owner", subscriber.label,
                 slot)
        self._refresh_topology_soon()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        """A background task ended: an exception it raised is logged, not lost."""
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("a Redis broker task failed: %r", exc, exc_info=exc)

    async def _on_owner(self, key: bytes, run: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run a command on the server owning ``key`` (re-resolved once after MOVED)."""
        shard = self._route(key)
        if shard is None and self.cluster:
            await self._refresh_topology()
            shard = self._route(key)
        if shard is None:
            raise ConnectionError("no Redis Cluster node known for this channel")
        try:
            return await run(shard.client)
        except MovedError:
            if not self.cluster:
                raise
            await self._refresh_topology()
            shard = self._route(key)
            if shard is None:
                raise
            return await run(shard.client)

    # -- channels --------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, name: bytes) -> AsyncIterator[None]:
        """One subscribe/unsubscribe/move of a channel at a time, in call order."""
        turn = self._turns.get(name)
        if turn is None:
            turn = self._turns[name] = _Turn(asyncio.Lock())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[name]

    async def subscribe(self, app: str, channel: str) -> None:
        name = channel_keys(self.prefix, app, channel).name
        async with self._turn(name):
            if name in self._served:
                return
            self._served[name] = (app, channel)
            self._seen[name] = {}
            shard = self._route(name)
            if shard is not None:
                await self._attach(name, shard, register_first=False)

    async def _attach(self, name: bytes, shard: Shard, *, register_first: bool) -> None:
        self._assigned[name] = shard
        if register_first:
            await self._register(shard, [name])
        if await shard.subscriber.add(name) and not register_first:
            await self._register(shard, [name])

    async def unsubscribe(self, app: str, channel: str) -> None:
        name = channel_keys(self.prefix, app, channel).name
        async with self._turn(name):
            if self._served.pop(name, None) is None:
                return
            self._seen.pop(name, None)
            self._offsets.pop(name, None)
            shard = self._assigned.pop(name, None)
            if shard is None:
                return
            try:  # first: a publish after this no longer expects this node
                await asyncio.wait_for(shard.client.zrem(name + b":nodes", self.node_id),
                                       COMMAND_TIMEOUT)
            except Exception as exc:
                self.warn.warning("unregister", 1, "%d registration(s) left in Redis %s (%s); "
                                  "they expire by themselves", shard.label, exc)
            await shard.subscriber.remove(name)

    async def _register(self, shard: Shard, names: list[bytes]) -> None:
        """Record (or refresh) that this node serves ``names``; failures are logged."""
        try:
            await self._heartbeat(shard, self._registrations(names))
        except Exception as exc:
            self.warn.warning("register", len(names), "%d channel registration(s) on Redis "
                              "%s failed (%s)", shard.label, exc)

    def _beat(self) -> tuple[bytes, int]:
        return self.node_id, int(self.liveness * 1000)

    def _registrations(self, names: Iterable[bytes]) -> list[Call]:
        """REGISTER calls for ``names``: many keys per call, all in one slot on a Cluster."""
        groups: dict[int, list[bytes]] = defaultdict(list)
        for name in names:
            groups[key_slot(name) if self.cluster else 0].append(name + b":nodes")
        return [(REGISTER, keys[start:start + REGISTER_KEYS], self._beat())
                for keys in groups.values() for start in range(0, len(keys), REGISTER_KEYS)]

    async def _heartbeat(self, shard: Shard, calls: list[Call]) -> None:
        """Run registration scripts on ``shard``. A connection failure raises; a call the
        server refuses (MOVED: the slot moved) is logged, and sends for the slot's owner."""
        for start in range(0, len(calls), 1000):
            results = await run_pipelined(shard.client, calls[start:start + 1000])
            failed = [result for result in results if isinstance(result, Exception)]
            if failed:
                if any(isinstance(result, MovedError) for result in failed):
                    self._refresh_topology_soon()
                self.warn.warning(f"refused {shard.label}", len(failed), "%d registration(s) "
                                  "refused by Redis %s (%s)", shard.label, failed[0])

    async def prepare(self, subscriber: Subscriber) -> None:
        """Before (re-)subscribing on a server: register every channel wanted there and put
        back this node's presence entries (a restarted Redis lost both); the entries go
        through the presence queue, in order with the writes queued before and after."""
        shard = next((shard for shard in self._shards.values()
                      if shard.subscriber is subscriber), None)
        if shard is None:
            return
        for keys, members in self._present.items():
            if members and self._route(keys.name) is shard:
                self._queue_presence(shard, keys, self._presence_adds(keys, members))
        await self._heartbeat(shard, self._registrations(subscriber.wanted))

    # -- frames ----------------------------------------------------------------------------

    def publish(self, app: str, channel: str, frame: Frame) -> None:
        self._local(app, channel, frame)
        channels = self._publishing.get(app)
        state = channels.get(channel) if channels is not None else None
        if state is None:
            state = self._publisher(app, channel)
        if state.version != self._moves.version:
            self._aim(state)
        state.sequence += 1
        keys = state.keys
        self._send(state, Outgoing(keys.name, keys.nodes,
                                   HEADER.pack(self.node_id, self._epoch, state.sequence)
                                   + frame.packet))

    def _send(self, state: Publishing, item: Outgoing) -> None:
        if state.outbox is not None:
            state.outbox.put(item)
        elif not self._moves.hold(item.name, item):
            self._stats.publish_failures += 1
            if item.history is not None:
                item.history.done.set_exception(ConnectionError(
                    "no Redis Cluster node known for this channel yet"))
            self.warn.warning("unrouted", 1, "%d frame(s) not sent to other nodes: no Redis "
                              "Cluster node known for their channel yet")

    def publish_history(self, app: str, channel: str, head: str,
                        policy: HistoryPolicy) -> asyncio.Future[Position]:
        """Through the channel's outbox, in order with its other frames; the script numbers,
        keeps and publishes it, and this node's subscribers get it back from Redis like
        every other node's, so all of them see one order."""
        state = self._publishing.get(app, {}).get(channel) or self._publisher(app, channel)
        if state.version != self._moves.version:
            self._aim(state)
        state.sequence += 1
        keys = state.keys
        done: asyncio.Future[Position] = asyncio.get_running_loop().create_future()
        header = HEADER.pack(self.node_id, self._epoch | HISTORY_FLAG, state.sequence)
        write = HistoryWrite(keys.history, keys.position, (
            head.encode(), policy.size, max(1, round(policy.ttl * 1000)),
            max(1, round(max(policy.meta_ttl, policy.ttl) * 1000)), new_epoch(),
            header[:20].hex(), state.sequence), done)
        self._send(state, Outgoing(keys.name, keys.nodes, header, history=write))
        return done

    async def history(self, app: str, channel: str, policy: HistoryPolicy, *,
                      since: int | None = None, limit: int = 100,
                      reverse: bool = False) -> HistoryRead:
        keys = channel_keys(self.prefix, app, channel)
        meta_ttl = max(1, round(max(policy.meta_ttl, policy.ttl) * 1000))
        epoch, top, _, fresh, entries, expired = await self._on_owner(
            keys.name, lambda client: run_script(
                client, READ_HISTORY, (keys.history, keys.position),
                (-1 if since is None else since, limit, 1 if reverse else 0, new_epoch(),
                 meta_ttl, max(1, round(policy.ttl * 1000)))))
        frames: list[Frame] = []
        for entry_id, fields in entries:
            values = dict(zip(fields[::2], fields[1::2], strict=True))
            offset = int(bytes(entry_id).split(b"-", 1)[1])
            frames.append(Frame(packet=bytes(values[b"f"]), offset=offset))
        return HistoryRead(Position(int(top), bytes(epoch).decode(), bool(int(fresh))), frames,
                           expired=bool(int(expired)))

    async def claim_idempotency(self, app: str, channel: str, key: str,
                                window: float) -> dict[str, Any] | None:
        name = channel_keys(self.prefix, app, channel)
        redis_key = name.idempotency(key)
        ttl = max(1, round(min(window, PENDING_CLAIM_SECONDS) * 1000))
        mine = b"~" + secrets.token_hex(8).encode()  # a replayed SET NX still finds it ours

        async def claim(client: aioredis.Redis) -> Any:
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(redis_key, mine, nx=True, px=ttl)
                pipe.get(redis_key)
                return await pipe.execute()

        _, value = await self._on_owner(name.name, claim)
        if value == mine:
            return None
        if not value or bytes(value).startswith(b"~"):
            return {}  # another publish with this key is still running
        try:
            known = codec.loads(value)
        except ValueError:
            return {}
        return known if isinstance(known, dict) else {}

    async def settle_idempotency(self, app: str, channel: str, key: str,
                                 ack: dict[str, Any] | None, window: float) -> None:
        name = channel_keys(self.prefix, app, channel)
        redis_key = name.idempotency(key)
        if ack is None:
            await self._on_owner(name.name, lambda client: client.delete(redis_key))
        else:
            await self._on_owner(name.name, lambda client: client.set(
                redis_key, codec.dumps(ack), xx=True, px=max(1, round(window * 1000))))

    def _publisher(self, app: str, channel: str) -> Publishing:
        """A channel's first frame (since this node last forgot its channels, which starts a
        new epoch: receivers then know the sequences start over)."""
        if self._publishing_count >= MAX_SEQUENCES:
            self._publishing.clear()
            self._publishing_count = 0
            self._epoch += 1
        state = Publishing(channel_keys(self.prefix, app, channel))
        self._publishing.setdefault(app, {})[channel] = state
        self._publishing_count += 1
        return state

    def _aim(self, state: Publishing) -> None:
        """Route a channel's frames for the current slot map (none while it is held)."""
        name = state.keys.name
        shard = None if name in self._moves.held else self._route(name)
        state.outbox = shard.outbox if shard is not None else None
        state.version = self._moves.version

    def received(self, name: bytes, payload: bytes) -> None:
        """A frame from Redis: write it to this node's subscribers, unless it is for a
        channel no longer served, this node's own, or one already delivered."""
        target = self._served.get(name)
        if target is None:
            return
        if len(payload) < PREFIX_BYTES:
            self.warn.warning("malformed", 1, "%d malformed frame(s) ignored on %r",
                              name[:120])
            return
        sender, epoch, sequence = HEADER.unpack_from(payload)
        offset = None
        start = PREFIX_BYTES
        if epoch & HISTORY_FLAG:
            bar = payload.find(b"|", PREFIX_BYTES, PREFIX_BYTES + 21)
            try:
                offset = int(payload[PREFIX_BYTES:bar])
            except ValueError:
                self.warn.warning("malformed", 1, "%d malformed frame(s) ignored on %r", name[:120])
                return
            start = bar + 1
            self._count_gap(name, offset)
        elif sender == self.node_id:
            return  # delivered here when it was published
        seen = self._seen[name]
        last = seen.get(sender)
        if last is not None and last[0] == epoch:
            if sequence <= last[1]:
                self.duplicates_dropped += 1
                return
            if sequence > last[1] + 1:
                missed = sequence - last[1] - 1
                self.missed_frames += missed
                self.warn.warning("missed", missed, "%d frame(s) from another node missed on "
                                  "%r (Redis lost them, or this node was re-subscribing)",
                                  name[:120])
        elif last is None and len(seen) >= MAX_SENDERS:
            seen.clear()
        seen[sender] = (epoch, sequence)
        self._stats.received += 1
        try:
            self._local(target[0], target[1], Frame(packet=payload[start:], offset=offset))
        except Exception:
            log.exception("delivering a frame from another node on %r failed", name[:120])

    def _count_gap(self, name: bytes, offset: int) -> None:
        last = self._offsets.get(name)
        if last is not None and offset > last + 1:
            missed = offset - last - 1
            self.history_gaps += missed
            self.warn.warning("history gap", missed, "%d history message(s) missed from Redis on "
                              "%r (clients recover them from the stream)", name[:120])
        if last is None or offset > last or offset == 1:
            self._offsets[name] = offset

    async def occupied(self, app: str, limit: int) -> list[str]:
        """Channels with a presence hash, found by SCAN on every server (an operator's
        question, not a hot path); presence entries of dead nodes are cleaned up within
        the liveness period, so a channel may linger that long."""
        head = f"{self.prefix}:{{{quote(app, safe='')}:"
        pattern = glob_escape(head) + "*}:presence"
        found: set[str] = set()
        for shard in list(self._shards.values()):
            async for key in shard.client.scan_iter(match=pattern, count=1000):
                name = bytes(key).decode()[len(head):-len("}:presence")]
                found.add(unquote(name))
                if len(found) >= limit * 2:
                    break
        return sorted(found)[:limit]

    # -- work queues (webhooks): one sorted set each, on its hash tag's server --------------

    def _queue_key(self, queue: str) -> bytes:
        return f"{self.prefix}:queue:{{{quote(queue, safe='')}}}".encode()

    async def enqueue(self, queue: str, items: list[bytes]) -> None:
        key = self._queue_key(queue)
        refused = await self._on_owner(key, lambda client: run_script(
            client, QUEUE_ADD, (key,), (MAX_QUEUED, *items)))
        if int(refused):
            raise OverflowError(f"queue {queue[:80]!r} is full ({MAX_QUEUED} items)")

    async def claim(self, queue: str, limit: int, lease: float) -> list[bytes]:
        key = self._queue_key(queue)
        due = await self._on_owner(key, lambda client: run_script(
            client, QUEUE_CLAIM, (key,), (limit, max(1, round(lease * 1000)))))
        return [bytes(item) for item in due]

    async def settle(self, queue: str, item: bytes, again: bytes | None, delay: float) -> None:
        key = self._queue_key(queue)
        await self._on_owner(key, lambda client: run_script(
            client, QUEUE_SETTLE, (key,), (item, again or b"", max(0, round(delay * 1000)))))

    # -- presence --------------------------------------------------------------------------

    async def presence_add(self, app: str, channel: str, member: str,
                           info: dict[str, Any]) -> None:
        """Recorded here at once; in Redis through the presence queue (``flush`` waits)."""
        keys = channel_keys(self.prefix, app, channel)
        value = self.node_id + codec.dumps(info).encode()
        self._present.setdefault(keys, {})[member] = value
        self._write_presence(keys, [(PRESENCE_ADD, (keys.present, keys.presence),
                                     (*self._beat(), member, value))])

    async def occupancy_change(self, app: str, channel: str) -> bool | None:
        """This node's count, written in order behind its presence writes, so the counts
        Redis holds are never older than the presence they follow."""
        keys = channel_keys(self.prefix, app, channel)
        shard = self._route(keys.name)
        if shard is None:
            raise ConnectionError("no Redis Cluster node known for this channel yet")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        count = len(self._present.get(keys, ()))
        shard.presence.put(PresenceWrite(keys.name, (
            OCCUPANCY, (keys.present, keys.occupancy), (*self._beat(), count)), done))
        before, after = await done
        if (int(before) > 0) == (int(after) > 0):
            return None
        return int(after) > 0

    async def presence_remove(self, app: str, channel: str, member: str) -> None:
        keys = channel_keys(self.prefix, app, channel)
        members = self._present.get(keys)
        if members is None or members.pop(member, None) is None:
            return
        if not members:
            del self._present[keys]
        self._write_presence(keys, [(PRESENCE_REMOVE, (keys.presence,), (member,))])

    def _write_presence(self, keys: ChannelKeys, calls: list[Call]) -> None:
        shard = self._route(keys.name)
        if shard is None:
            self.presence_failed([keys.name], ConnectionError(
                "no Redis Cluster node known for this channel yet"))
        else:
            self._queue_presence(shard, keys, calls)

    def _queue_presence(self, shard: Shard, keys: ChannelKeys, calls: list[Call]) -> None:
        for call in calls:
            if not shard.presence.put(PresenceWrite(keys.name, call)):
                return  # refused: counted, and the channel re-synchronised later

    def _presence_adds(self, keys: ChannelKeys, members: Mapping[str, bytes]) -> list[Call]:
        """PRESENCE_ADD calls writing ``members`` (several per call)."""
        pairs = [part for member, value in members.items() for part in (member, value)]
        step = 2 * PRESENCE_PAIRS
        return [(PRESENCE_ADD, (keys.present, keys.presence), (*self._beat(), *pairs[i:i + step]))
                for i in range(0, len(pairs), step)]

    def presence_failed(self, names: list[bytes], error: Exception) -> None:
        """Presence writes that did not reach Redis: counted, and their channels are written
        again from this node's record (soon after a slot move, else with the next refresh)."""
        self.presence_failures += len(names)
        self._unsynced.update(ChannelKeys.of(name) for name in names)
        self.warn.warning("presence", len(names), "%d presence update(s) not stored in Redis "
                          "(%s); retried within %.0fs", error, self.liveness / 3)
        if self.cluster and isinstance(error, AskError | TryAgainError):  # the slot moves
            self._repair_presence_soon()

    def _repair_presence_soon(self) -> None:
        if self._repairing:
            return
        self._repairing = True

        async def repair() -> None:
            try:
                await self._refresh_topology()
                await self._resync_unsynced()
            finally:
                self._repairing = False

        self._spawn(repair())

    async def presence(self, app: str, channel: str) -> dict[str, dict[str, Any]]:
        keys = channel_keys(self.prefix, app, channel)
        try:
            flat = await self._on_owner(keys.name, lambda client: run_script(
                client, PRESENCE_READ, (keys.present, keys.presence),
                (NODE_ID_BYTES, self.node_id)))
        except Exception as exc:
            # a partial answer would be a wrong one ("on every node"): the caller says
            # unavailable, and the asker retries
            self.presence_failures += 1
            self.warn.warning("presence read", 1, "%d presence read(s) refused: Redis "
                              "unreachable (%s)", exc)
            raise ConnectionError(f"presence of {channel[:80]!r}: Redis unreachable") from exc
        found: dict[str, dict[str, Any]] = {}
        for index in range(0, len(flat) - 1, 2):
            try:
                found[flat[index].decode()] = codec.loads(flat[index + 1])
            except ValueError:
                log.warning("ignored a malformed presence entry in %r", keys.presence[:120])
        # this node's own members: from its record, which is ahead of Redis (queued writes)
        for member, value in self._present.get(keys, {}).items():
            found[member] = codec.loads(value[NODE_ID_BYTES:])
        return found

    async def _resync_presence(self, keys: ChannelKeys) -> None:
        """Make Redis hold exactly this node's entries for a channel after failed writes:
        the removals and writes go through the presence queue, in order with the rest."""
        stored: dict[Any, Any] = await self._on_owner(
            keys.name, lambda client: client.hgetall(keys.presence))
        shard = self._route(keys.name)
        if shard is None:
            raise ConnectionError("no Redis Cluster node known for this channel")
        local = self._present.get(keys, {})
        stale = [bytes(member) for member, value in stored.items()
                 if bytes(value).startswith(self.node_id)
                 and bytes(member).decode(errors="replace") not in local]
        calls: list[Call] = [(PRESENCE_REMOVE, (keys.presence,), stale[i:i + PRESENCE_PAIRS])
                             for i in range(0, len(stale), PRESENCE_PAIRS)]
        self._unsynced.discard(keys)  # before queueing: a refused write marks it again
        self._queue_presence(shard, keys, calls + self._presence_adds(keys, local))

    async def _resync_unsynced(self) -> None:
        for keys in list(self._unsynced):
            try:
                await self._resync_presence(keys)
            except Exception as exc:
                log.debug("presence of %r still not in Redis: %s", keys.name[:120], exc)

    # -- upkeep ----------------------------------------------------------------------------

    async def _maintain(self) -> None:
        """Refresh registrations and presence liveness; re-read the cluster's slot owners."""
        while True:
            interval = self.liveness / 3
            if self.cluster and not self._topology_known:
                interval = 1.0
            await asyncio.sleep(interval)
            try:
                await self._refresh()
            except Exception:
                log.exception("refreshing this node's registrations in Redis failed")

    async def _refresh(self) -> None:
        if self.cluster:
            await self._refresh_topology()
        served: dict[Shard, list[bytes]] = defaultdict(list)
        for name, shard in self._assigned.items():
            served[shard].append(name)
        work = {shard: self._registrations(names) for shard, names in served.items()}
        for keys, members in self._present.items():
            owner = self._route(keys.name)
            if owner is not None and members and keys not in self._unsynced:
                work.setdefault(owner, []).append(
                    (PRESENCE_BEAT, (keys.present, keys.presence, keys.occupancy), self._beat()))

        async def beat(shard: Shard, calls: list[Call]) -> None:
            try:
                await self._heartbeat(shard, calls)
            except Exception as exc:
                self.warn.warning("heartbeat", len(calls), "%d registration refresh(es) on "
                                  "Redis %s failed (%s)", shard.label, exc)

        await asyncio.gather(*(beat(shard, calls) for shard, calls in work.items()))
        await self._resync_unsynced()

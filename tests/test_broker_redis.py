"""The Redis broker, in-process: several RedisBroker instances in one event loop are several
nodes, on real redis-server processes (one, three, and a three-primary Redis Cluster)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as syncredis
from redis.crc import key_slot

from echo.broker.base import BrokerStats
from echo.broker.connection import redis_client
from echo.broker.outbox import Outbox, Outgoing
from echo.broker.redis import RedisBroker, channel_keys, hash_tag
from echo.broker.ring import HashRing
from echo.broker.scripts import LuaScript
from echo.broker.throttle import ThrottledLog
from echo.config import Settings
from echo.core.associations import parse_associations
from echo.core.store import FileStore, RedisStore
from echo.transport.base import Frame
from tests.conftest import REPO, RedisServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

APP = "chat"
_prefixes = itertools.count()


def redis_binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (apt-get install -y redis-server)")
        pytest.skip(f"SKIPPED LOUDLY: {name} is not installed; "
                    "`apt-get install -y redis-server` to run the Redis broker tests")
    return binary


class Cluster:
    """A Redis Cluster of three primaries (no replicas), each a redis-server process."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.ports: list[int] = []
        while len(self.ports) < size:
            port = free_port()
            # each node also listens on port + 10000 (the cluster bus)
            if port + 10000 <= 65535 and port not in self.ports and bindable(port + 10000):
                self.ports.append(port)
        self.urls = [f"redis://127.0.0.1:{port}/0" for port in self.ports]
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> Cluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Cluster:
        server, cli = redis_binary("redis-server"), redis_binary("redis-cli")
        for port in self.ports:
            self.processes.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir), "--cluster-enabled", "yes",
                 "--cluster-config-file", str(self.workdir / f"nodes-{port}.conf"),
                 "--cluster-node-timeout", "2000"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in self.ports:
            wait_listening(port)
        subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(self.client(i).cluster("INFO")["cluster_state"] == "ok"
                   for i in range(len(self.ports))):
                return self
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def client(self, index: int) -> syncredis.Redis:
        return syncredis.Redis(port=self.ports[index], protocol=2)

    def owner_index(self, name: bytes) -> int:
        slot = key_slot(name)
        for start, end, primary, *_ in self.client(0).cluster("SLOTS"):
            if start <= slot <= end:
                return self.ports.index(int(primary[1]))
        raise AssertionError(f"no owner for slot {slot}")

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_listening(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@pytest.fixture(scope="module")
def redis_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    redis_binary("redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    redis_binary("redis-server")
    servers = [RedisServer(tmp_path_factory.mktemp("redis")).start() for _ in range(3)]
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def redis_own(tmp_path: Path) -> Iterator[RedisServer]:
    """A server the test may kill and restart."""
    redis_binary("redis-server")
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = Cluster(tmp_path_factory.mktemp("cluster")).start()
    yield started
    started.stop()


class Node:
    """A broker as one Echo node: records every frame it delivers to its subscribers."""

    def __init__(self, urls: list[str], prefix: str, **options: Any) -> None:
        self.broker = RedisBroker(urls, prefix=prefix, **options)
        self.got: dict[str, list[bytes]] = defaultdict(list)

    def deliver(self, app: str, channel: str, frame: Frame) -> None:
        self.got[channel].append(frame.packet)

    async def __aenter__(self) -> Node:
        await self.broker.start(self.deliver)
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.broker.close()

    @property
    def stats(self) -> Any:
        return self.broker.stats


def new_prefix() -> str:
    return f"t{os.getpid()}-{next(_prefixes)}"


def frame(channel: str, index: int, body: str = "") -> Frame:
    return Frame.event("/" + APP, "message", {"channel": channel, "n": index, "text": body})


def number(packet: bytes) -> int:
    return int(Frame(packet=packet).decode()[2][0]["n"])


async def until(check: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)


def pubsub_channels(client: syncredis.Redis, prefix: str, sharded: bool = False) -> set[bytes]:
    pattern = f"{prefix}:*"
    found = client.pubsub_shardchannels(pattern) if sharded else client.pubsub_channels(pattern)
    return {name.encode() if isinstance(name, str) else name for name in found}


def name_of(prefix: str, channel: str, app: str = APP) -> bytes:
    return channel_keys(prefix, app, channel).name


# -- names and placement ---------------------------------------------------------------------


def test_channel_names_are_unambiguous_and_share_a_hash_tag() -> None:
    pairs = [("a:b", "c"), ("a", "b:c"), ("{x}", "y"), ("x", "y"), ("a b%", "c"), ("a", "c#presence")]
    names = {channel_keys("echo", app, channel).name for app, channel in pairs}
    assert len(names) == len(pairs)
    for app, channel in pairs:
        keys = channel_keys("echo", app, channel)
        assert keys.name.count(b"{") == 1 and keys.name.count(b"}") == 1
        tags = {hash_tag(key) for key in keys}
        assert len(tags) == 1, keys  # every key of a channel in the channel's slot
        assert len({key_slot(key) for key in keys}) == 1
    assert channel_keys("echo", "chat", "room:1").name == b"echo:{chat:room:1}"


def test_from_settings_reads_every_url() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0, redis://127.0.0.1:2/0",
                        redis_cluster=True)
    broker = RedisBroker.from_settings(settings)
    assert (broker.urls, broker.cluster) == (["redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0"],
                                             True)


def test_hash_ring_keeps_most_keys_when_a_server_is_added() -> None:
    keys = [f"app:channel-{index}".encode() for index in range(20_000)]
    three = HashRing({f"redis://10.0.0.{i}:6379": i for i in range(3)})
    four = HashRing({f"redis://10.0.0.{i}:6379": i for i in range(4)})
    before = [three.get(key) for key in keys]
    after = [four.get(key) for key in keys]
    kept = sum(a == b for a, b in zip(before, after, strict=True)) / len(keys)
    assert kept > 0.68, kept  # ideal: 3/4 stay
    assert all(b == 3 for a, b in zip(before, after, strict=True) if a != b)  # moved: to the new one
    shares = [before.count(i) / len(keys) for i in range(3)]
    assert all(0.22 < share < 0.45 for share in shares), shares
    # the order servers are listed in does not matter
    shuffled = HashRing({f"redis://10.0.0.{i}:6379": i for i in (2, 0, 1)})
    assert [shuffled.get(key) for key in keys[:2000]] == before[:2000]


# -- one Redis ------------------------------------------------------------------------------


async def test_only_serving_nodes_receive_frames_byte_identical_and_in_order(
        redis_one: RedisServer) -> None:
    prefix = new_prefix()
    admin = syncredis.Redis(port=redis_one.port)
    async with Node([redis_one.url], prefix) as a, Node([redis_one.url], prefix) as b, \
            Node([redis_one.url], prefix) as c:
        await b.broker.subscribe(APP, "room")
        await c.broker.subscribe(APP, "other")
        assert pubsub_channels(admin, prefix) == {name_of(prefix, "room"), name_of(prefix, "other")}
        assert admin.pubsub_numsub(name_of(prefix, "room"))[0][1] == 1
        sent = [frame("room", i, "héllo \u2603 " * (i % 7)) for i in range(1000)]
        started = time.perf_counter()
        for item in sent:
            a.broker.publish(APP, "room", item)
        await until(lambda: len(b.got["room"]) >= 1000, what="1,000 frames at node b")
        elapsed = time.perf_counter() - started
        print(f"\n1,000 frames node a -> node b through one Redis: {1000 / elapsed:,.0f} frames/s")
        assert b.got["room"] == [item.packet for item in sent]
        assert a.got["room"] == [item.packet for item in sent]  # delivered locally at once
        await a.broker.flush()
        await asyncio.sleep(0.1)
        assert c.stats.received == 0 and not c.got
        assert a.stats.received == 0  # its own frames came back from Redis and were skipped
        assert (a.stats.published, b.stats.received) == (1000, 1000)
        assert (a.stats.publish_failures, a.stats.lost_receivers) == (0, 0)
        assert b.stats.extra["missed_frames"] == 0
        # registry: b serves the room, c the other channel
        assert admin.zrange(name_of(prefix, "room") + b":nodes", 0, -1) == [b.broker.node_id]


async def test_unsubscribe_stops_delivery(redis_one: RedisServer) -> None:
    prefix = new_prefix()
    admin = syncredis.Redis(port=redis_one.port)
    async with Node([redis_one.url], prefix) as a, Node([redis_one.url], prefix) as b:
        await b.broker.subscribe(APP, "room")
        a.broker.publish(APP, "room", frame("room", 1))
        await until(lambda: len(b.got["room"]) == 1)
        await b.broker.unsubscribe(APP, "room")
        assert pubsub_channels(admin, prefix) == set()
        assert admin.zcard(name_of(prefix, "room") + b":nodes") == 0
        a.broker.publish(APP, "room", frame("room", 2))
        await a.broker.flush()
        await asyncio.sleep(0.2)
        assert len(b.got["room"]) == 1 and b.stats.received == 1
        assert a.stats.lost_receivers == 0
        await b.broker.subscribe(APP, "room")  # and back
        admin.publish(name_of(prefix, "room"), b"not a frame")  # ignored, the listener lives on
        a.broker.publish(APP, "room", frame("room", 3))
        await until(lambda: len(b.got["room"]) == 2)
        assert number(b.got["room"][-1]) == 3 and b.stats.reconnects == 0


async def test_outbox_is_bounded_and_a_burst_opens_few_connections(redis_one: RedisServer) -> None:
    prefix = new_prefix()
    admin = syncredis.Redis(port=redis_one.port)
    async with Node([redis_one.url], prefix) as a, Node([redis_one.url], prefix) as b:
        await b.broker.subscribe(APP, "room")
        opened = int(admin.info("stats")["total_connections_received"])
        started = time.perf_counter()
        for index in range(15_000):  # no await: the sender cannot run, the outbox fills
            a.broker.publish(APP, "room", frame("room", index))
        assert a.stats.publish_failures == 5_000  # over the 10,000 bound: dropped, counted
        # a connect storm's presence traffic on the same node, all at once
        await asyncio.gather(*(a.broker.presence_add(APP, "room", f"conn-{i}", {"user": i})
                               for i in range(2_000)))
        await a.broker.flush()
        await until(lambda: len(b.got["room"]) >= 10_000, timeout=20)
        elapsed = time.perf_counter() - started
        new_connections = int(admin.info("stats")["total_connections_received"]) - opened
        print(f"\n10,000 frames (+ 2,000 presence writes) node a -> node b in {elapsed:.2f}s "
              f"({10_000 / elapsed:,.0f} frames/s), {new_connections} new Redis connection(s)")
        assert [number(packet) for packet in b.got["room"]] == list(range(10_000))
        assert new_connections <= 17  # the bounded pool (16) and b's subscriber, not thousands
        assert len(await b.broker.presence(APP, "room")) == 2_000


async def test_a_presence_storm_is_pipelined_and_read_back(redis_one: RedisServer) -> None:
    """5,000 presence writes awaited one after another (as the core makes them, one per
    connection and channel) take a few pipelines on one connection, not a round trip each;
    the writing node sees its own at once, another node once they are flushed."""
    prefix = new_prefix()
    admin = syncredis.Redis(port=redis_one.port)
    rooms = [f"room-{index}" for index in range(10)]
    async with Node([redis_one.url], prefix) as a, Node([redis_one.url], prefix) as b:
        before = admin.info("stats")
        started = time.perf_counter()
        for index in range(5_000):
            await a.broker.presence_add(APP, rooms[index % 10], f"conn-{index}", {"user": index})
        queued = time.perf_counter() - started
        assert len(await a.broker.presence(APP, "room-3")) == 500  # its own, sent or not
        await asyncio.wait_for(a.broker.flush(), 10)
        elapsed = time.perf_counter() - started
        after = admin.info("stats")
        reads = after["total_reads_processed"] - before["total_reads_processed"]
        connections = (after["total_connections_received"]
                       - before["total_connections_received"])
        print(f"\n5,000 presence writes: queued in {queued * 1000:.0f} ms, in Redis after "
              f"{elapsed * 1000:.0f} ms; {connections} new connection(s), {reads} socket reads")
        assert connections <= 17
        assert reads < 500  # one round trip each would be 5,000 reads
        for room in rooms:
            assert len(await b.broker.presence(APP, room)) == 500
        assert (await b.broker.presence(APP, "room-7"))["conn-17"] == {"user": 17}
        # removals queue behind the additions: an add and its remove never swap
        for index in range(0, 5_000, 2):
            await a.broker.presence_remove(APP, rooms[index % 10], f"conn-{index}")
        await a.broker.presence_add(APP, "room-0", "conn-0", {"user": "back"})
        assert len(await a.broker.presence(APP, "room-0")) == 1
        await asyncio.wait_for(a.broker.flush(), 10)
        assert await b.broker.presence(APP, "room-0") == {"conn-0": {"user": "back"}}
        assert len(await b.broker.presence(APP, "room-1")) == 500
        assert set(a.stats.extra) == {"missed_frames", "duplicates_dropped", "presence_failures",
                                    "history_gaps"}
        assert a.stats.extra["presence_failures"] == 0


async def test_outbox_counts_a_pipeline_an_unexpected_error_stopped(
        redis_one: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A reply the outbox cannot read (here a script that answers 1, not a pair) stops the
    pipeline: its frames are counted as not sent and the error is logged."""
    client = redis_client(redis_one.url)
    stats = BrokerStats()
    outbox = Outbox(client, "test", LuaScript("return 1"), stats,
                    ThrottledLog(logging.getLogger("test")))
    try:
        for _ in range(5):
            outbox.put(Outgoing(b"x", b"x:nodes", b"payload"))
        await asyncio.wait_for(outbox.flush(), 5)
        assert (stats.publish_failures, stats.published) == (5, 0)
        assert "failed unexpectedly" in caplog.text
        outbox.put(Outgoing(b"x", b"x:nodes", b"payload"))  # and it still sends
        await asyncio.wait_for(outbox.flush(), 5)
        assert stats.publish_failures == 6
    finally:
        await outbox.close()
        await client.aclose()
        await client.connection_pool.disconnect()


async def test_a_failing_background_task_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    broker = RedisBroker(["redis://127.0.0.1:1/0"], cluster=True)

    async def fails() -> None:
        raise RuntimeError("boom in the background")

    broker._spawn(fails())
    await asyncio.sleep(0.05)
    assert "boom in the background" in caplog.text


async def test_lost_receivers_counted_when_a_subscription_drops(redis_one: RedisServer) -> None:
    """Redis cuts b's pub/sub connection: a's publishes before b is back are counted by a
    (fewer receivers than registered nodes) and by b (a gap in a's sequence)."""
    prefix = new_prefix()
    admin = syncredis.Redis(port=redis_one.port)
    async with Node([redis_one.url], prefix) as a, Node([redis_one.url], prefix) as b:
        await b.broker.subscribe(APP, "room")
        sent = 0

        async def publish_until(check: Callable[[], bool]) -> None:
            nonlocal sent
            while not check():
                a.broker.publish(APP, "room", frame("room", sent))
                sent += 1
                await asyncio.sleep(0.002)

        await publish_until(lambda: len(b.got["room"]) > 20)
        admin.client_kill_filter(_type="pubsub")
        await publish_until(lambda: b.stats.reconnects == 1 and len(b.got["room"]) > 0
                            and number(b.got["room"][-1]) > sent - 5 and sent > 200)
        await a.broker.flush()
        await until(lambda: number(b.got["room"][-1]) == sent - 1)
        got = [number(packet) for packet in b.got["room"]]
        missed = b.stats.extra["missed_frames"]
        assert got == sorted(set(got))  # in order, no duplicate
        assert a.stats.lost_receivers > 0 and missed >= a.stats.lost_receivers
        assert len(got) + missed == got[-1] - got[0] + 1  # every frame received or counted
        assert a.stats.publish_failures == 0


async def test_redis_restart_resubscribes_and_counts_what_was_lost(redis_own: RedisServer) -> None:
    prefix = new_prefix()
    async with Node([redis_own.url], prefix) as a, Node([redis_own.url], prefix) as b:
        await b.broker.subscribe(APP, "room")
        await b.broker.presence_add(APP, "room", "conn-b", {"user": "b"})
        sent = 0

        async def publish_for(seconds: float) -> None:
            nonlocal sent
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                a.broker.publish(APP, "room", frame("room", sent))
                sent += 1
                await asyncio.sleep(0.005)

        await publish_for(0.3)
        assert b.got["room"]
        redis_own.stop()
        await publish_for(2.5)  # well past the client's retry window (~0.7 s): sends must fail
        assert "unreachable" in " ".join(await a.broker.problems())
        redis_own.start()
        await until(lambda: b.stats.reconnects >= 1, timeout=10, what="b re-subscribed")
        await publish_for(0.5)
        await a.broker.flush()
        await until(lambda: number(b.got["room"][-1]) == sent - 1, what="delivery resumed")
        got = [number(packet) for packet in b.got["room"]]
        missed = b.stats.extra["missed_frames"]
        print(f"\nRedis restart: {sent} sent, {len(got)} received by b, {missed} counted missed "
              f"by b, {a.stats.publish_failures} publish failures, {a.stats.lost_receivers} "
              f"lost receivers counted by a")
        assert got == sorted(set(got))
        assert a.stats.publish_failures > 0
        assert missed > 0 and len(got) + missed == got[-1] - got[0] + 1
        # the restarted Redis was empty: b put its registration and presence back
        assert await a.broker.presence(APP, "room") == {"conn-b": {"user": "b"}}
        assert await a.broker.problems() == [] and await b.broker.problems() == []


# -- several Redis servers -------------------------------------------------------------------


async def test_channels_spread_over_three_servers(redis_three: list[RedisServer]) -> None:
    prefix = new_prefix()
    urls = [server.url for server in redis_three]
    admins = {f"127.0.0.1:{s.port}": syncredis.Redis(port=s.port) for s in redis_three}
    channels = [f"room-{index}" for index in range(60)]
    async with Node(urls, prefix) as a, Node(list(reversed(urls)), prefix) as b:
        for channel in channels:
            await b.broker.subscribe(APP, channel)
        placement = {channel: b.broker.shard_of(APP, channel) for channel in channels}
        assert placement == {channel: a.broker.shard_of(APP, channel) for channel in channels}
        for label, admin in admins.items():
            expected = {name_of(prefix, c) for c, where in placement.items() if where == label}
            assert 5 < len(expected) < 40, (label, len(expected))
            assert pubsub_channels(admin, prefix) == expected
            # the channel's registry sits with its subscription
            assert all(admin.exists(name + b":nodes") for name in expected)
        for index in range(20):
            for channel in channels:
                a.broker.publish(APP, channel, frame(channel, index))
        await until(lambda: sum(len(b.got[c]) for c in channels) == 1200, what="1,200 frames")
        assert all([number(p) for p in b.got[c]] == list(range(20)) for c in channels)
        assert a.stats.lost_receivers == 0 and a.stats.publish_failures == 0


async def test_problems_names_the_unreachable_server(redis_three: list[RedisServer],
                                                     tmp_path: Path) -> None:
    spare = RedisServer(tmp_path).start()
    try:
        urls = [redis_three[0].url, spare.url]
        async with Node(urls, new_prefix()) as a:
            assert await a.broker.problems() == []
            spare.stop()
            problems = await a.broker.problems()
            assert len(problems) == 1 and f"127.0.0.1:{spare.port}" in problems[0], problems
            assert "unreachable" in problems[0]
    finally:
        spare.stop()


# -- Redis Cluster -----------------------------------------------------------------------------


async def test_cluster_sharded_pubsub_delivery_and_order(cluster: Cluster) -> None:
    prefix = new_prefix()
    channels = [f"room-{index}" for index in range(30)]
    async with Node(cluster.urls[:1], prefix, cluster=True) as a, \
            Node(cluster.urls[1:], prefix, cluster=True) as b, \
            Node(cluster.urls, prefix, cluster=True) as c:
        await c.broker.subscribe(APP, "elsewhere")
        for channel in channels:
            await b.broker.subscribe(APP, channel)
        owners = {channel: cluster.owner_index(name_of(prefix, channel)) for channel in channels}
        assert set(owners.values()) == {0, 1, 2}  # the channels span every primary
        for index in range(3):
            listed = pubsub_channels(cluster.client(index), prefix, sharded=True)
            expected = {name_of(prefix, c) for c, owner in owners.items() if owner == index}
            if cluster.owner_index(name_of(prefix, "elsewhere")) == index:
                expected.add(name_of(prefix, "elsewhere"))
            assert listed == expected
            assert pubsub_channels(cluster.client(index), prefix) == set()  # no plain pub/sub
        for index in range(50):
            for channel in channels:
                a.broker.publish(APP, channel, frame(channel, index))
        await until(lambda: sum(len(b.got[c]) for c in channels) == 1500, what="1,500 frames")
        assert all([number(p) for p in b.got[c]] == list(range(50)) for c in channels)
        await a.broker.flush()
        assert c.stats.received == 0
        assert (a.stats.lost_receivers, a.stats.publish_failures) == (0, 0)
        assert await a.broker.problems() == []


async def test_occupancy_turns_once_when_nodes_join_and_leave_at_once(cluster: Cluster) -> None:
    prefix = new_prefix()
    async with Node(cluster.urls, prefix, cluster=True) as a, \
            Node(cluster.urls, prefix, cluster=True) as b:
        async def change(node: Node, member: str, joining: bool) -> bool | None:
            if joining:
                await node.broker.presence_add(APP, "room", member, {})
            else:
                await node.broker.presence_remove(APP, "room", member)
            return await node.broker.occupancy_change(APP, "room")

        members = [(node, f"conn-{index}") for index, node in enumerate([a, b] * 10)]
        for _ in range(3):
            joined = await asyncio.gather(*(change(n, m, True) for n, m in members))
            assert joined.count(True) == 1 and False not in joined, joined
            left = await asyncio.gather(*(change(n, m, False) for n, m in members))
            assert left.count(False) == 1 and True not in left, left


async def test_cluster_presence_across_nodes_and_a_dead_node(cluster: Cluster) -> None:
    prefix = new_prefix()
    async with Node(cluster.urls, prefix, cluster=True) as a, \
            Node(cluster.urls, prefix, cluster=True) as b:
        await a.broker.presence_add(APP, "room", "conn-a", {"user": "a"})
        await b.broker.presence_add(APP, "room", "conn-b", {"user": "b"})
        await asyncio.gather(a.broker.flush(), b.broker.flush())  # queued: now in Redis
        dead = await asyncio.create_subprocess_exec(
            sys.executable, "-c", DYING_NODE, cluster.urls[0], prefix,
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert dead.stdout is not None
            line = await asyncio.wait_for(dead.stdout.readline(), 10)
            assert line.strip() == b"ready", line
            everyone = {"conn-a": {"user": "a"}, "conn-b": {"user": "b"}, "conn-d": {"user": "d"}}
            assert await a.broker.presence(APP, "room") == everyone
            assert await b.broker.presence(APP, "room") == everyone
        finally:
            dead.kill()
            await dead.wait()
        started = time.monotonic()
        while "conn-d" in await a.broker.presence(APP, "room"):
            assert time.monotonic() - started < 6, "a dead node's presence entry stayed"
            await asyncio.sleep(0.2)
        print(f"\na dead node's presence entry gone after {time.monotonic() - started:.1f}s "
              "(liveness 3 s)")
        await b.broker.presence_remove(APP, "room", "conn-b")
        await b.broker.flush()
        assert await a.broker.presence(APP, "room") == {"conn-a": {"user": "a"}}
        await b.broker.presence_add(APP, "room", "conn-b2", {"user": "b"})
    # both closed: their entries are removed, not left to expire
    async with Node(cluster.urls, prefix, cluster=True) as c:
        assert await c.broker.presence(APP, "room") == {}


DYING_NODE = """
import asyncio, sys, time
from echo.broker.redis import RedisBroker

async def main():
    broker = RedisBroker([sys.argv[1]], cluster=True, prefix=sys.argv[2], liveness=3.0)
    await broker.start(lambda app, channel, frame: None)
    await broker.presence_add("chat", "room", "conn-d", {"user": "d"})
    await broker.flush()
    print("ready", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_cluster_store_shares_associations(cluster: Cluster, tmp_path: Path) -> None:
    """The associations store on a Cluster: its two keys share a slot (its scripts touch
    both), commands reach the slot owner whichever seed is given, and a save reaches a
    store watching through another node."""
    prefix = new_prefix()
    durable = FileStore(tmp_path / "associations.json")
    first = RedisStore(cluster.urls[0], durable, prefix=prefix, cluster=True)
    second = RedisStore(",".join(cluster.urls[1:]), durable, prefix=prefix, cluster=True)
    assert key_slot(first.keys[0].encode()) == key_slot(first.keys[1].encode())
    changes = 0

    async def changed() -> None:
        nonlocal changes
        changes += 1

    watcher = asyncio.create_task(second.watch(changed))
    try:
        loaded = await first.load()  # seeded from the (missing, so empty) file
        assert loaded.document == {"applications": {}} and loaded.version > 0
        await until(lambda: changes >= 1, what="the watcher subscribed")
        document = {"applications": {"chat": {"channels": [
            {"channelName": "room", "functionNames": []}]}}}
        stored = await first.save(parse_associations(document))
        assert stored.version > loaded.version
        await until(lambda: changes >= 2, what="the save reached the other store")
        again = await second.load()
        assert (again.document, again.version) == (document, stored.version)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await first.close()
        await second.close()


async def test_cluster_slot_moved_resubscribes(cluster: Cluster) -> None:
    """The slot of a served channel moves to another primary: the server drops the shard
    subscription, the broker finds the new owner and subscribes there; the publisher's
    MOVED frames are re-sent to the new owner. (Runs last: it changes the slot map.)"""
    prefix = new_prefix()
    channel = next(f"moving-{i}" for i in itertools.count()
                   if key_slot(name_of(prefix, f"moving-{i}")) == 0)
    source = cluster.owner_index(name_of(prefix, channel))
    target = (source + 1) % 3
    async with Node(cluster.urls, prefix, cluster=True) as a, \
            Node(cluster.urls, prefix, cluster=True) as b:
        await b.broker.subscribe(APP, channel)
        a.broker.publish(APP, channel, frame(channel, 0))
        await until(lambda: len(b.got[channel]) == 1)
        ids = [cluster.client(i).cluster("MYID").decode() for i in range(3)]
        await asyncio.to_thread(subprocess.run, [
            redis_binary("redis-cli"), "--cluster", "reshard", f"127.0.0.1:{cluster.ports[0]}",
            "--cluster-from", ids[source], "--cluster-to", ids[target], "--cluster-slots", "1",
            "--cluster-yes"], check=True, capture_output=True, timeout=30)
        assert cluster.owner_index(name_of(prefix, channel)) == target
        await until(lambda: name_of(prefix, channel) in pubsub_channels(
            cluster.client(target), prefix, sharded=True), what="re-subscribed on the new owner")
        for index in range(1, 11):
            a.broker.publish(APP, channel, frame(channel, index))
        await until(lambda: len(b.got[channel]) == 11, what="delivery after the move")
        assert [number(p) for p in b.got[channel]] == list(range(11))


async def test_cluster_slot_move_under_load_keeps_frames_in_order(cluster: Cluster) -> None:
    """A node publishes without pause while the channel's slot moves to another primary:
    frames the old owner refused (MOVED), and those published while the new owner was being
    found, reach the receiver in publish order: none is dropped as a duplicate, and each
    frame it did not get is counted as missed. (Runs last: it changes the slot map.)"""
    prefix = new_prefix()
    source, target = 0, 1
    # a reshard of one slot moves the source's lowest one
    slot = min(start for start, _end, primary, *_ in cluster.client(0).cluster("SLOTS")
               if int(primary[1]) == cluster.ports[source])
    channel = next(f"busy-{i}" for i in itertools.count()
                   if key_slot(name_of(prefix, f"busy-{i}")) == slot)
    name = name_of(prefix, channel)
    async with Node(cluster.urls, prefix, cluster=True) as a, \
            Node(cluster.urls, prefix, cluster=True) as b:
        await b.broker.subscribe(APP, channel)
        sent = 0
        stop = asyncio.Event()

        async def publish() -> None:
            nonlocal sent
            while not stop.is_set():
                for _ in range(5):
                    a.broker.publish(APP, channel, frame(channel, sent))
                    sent += 1
                await asyncio.sleep(0.001)

        publisher = asyncio.create_task(publish())
        try:
            await until(lambda: len(b.got[channel]) > 50, what="frames before the move")
            await asyncio.sleep(0.6)  # the slot map is re-read at most every 0.5 s
            ids = [cluster.client(i).cluster("MYID").decode() for i in range(3)]
            await asyncio.to_thread(subprocess.run, [
                redis_binary("redis-cli"), "--cluster", "reshard",
                f"127.0.0.1:{cluster.ports[0]}", "--cluster-from", ids[source],
                "--cluster-to", ids[target], "--cluster-slots", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=30)
            assert cluster.owner_index(name) == target
            moved_at = sent
            await until(lambda: number(b.got[channel][-1]) > moved_at + 500, timeout=15,
                        what="delivery through the new owner")
        finally:
            stop.set()
            await publisher
        await asyncio.wait_for(a.broker.flush(), 10)
        await until(lambda: number(b.got[channel][-1]) == sent - 1, what="the last frame")
        await asyncio.sleep(1)  # a frame re-sent behind newer ones would arrive by now
        got = [number(packet) for packet in b.got[channel]]
        missed = b.stats.extra["missed_frames"]
        print(f"\nslot move under load: {sent} sent, {len(got)} received, {missed} counted "
              f"missed, {b.stats.extra['duplicates_dropped']} dropped as duplicates, "
              f"{a.stats.lost_receivers} lost receivers counted by the publisher")
        assert b.stats.extra["duplicates_dropped"] == 0
        assert got == sorted(set(got)) and got[0] == 0
        assert len(got) + missed == sent  # every frame received or counted
        assert a.stats.publish_failures == 0


async def test_a_replayed_history_script_keeps_and_numbers_the_message_once(
        redis_one: RedisServer) -> None:
    """A client library that re-sends a pipeline whose reply was lost runs the script again:
    the stream still holds the message once, and the replay answers with its offset."""
    from echo.broker.scripts import PUBLISH_HISTORY, READ_HISTORY, run_script

    client = redis_client(redis_one.url)
    keys = channel_keys("replay", "app", "chan")
    try:
        def args(sequence: int) -> tuple[Any, ...]:
            head = b"H" * 20 + sequence.to_bytes(8, "big")
            return (head, b'42/app,["message",{"offset":', 100, 60_000, 60_000, "epoch-1",
                    head[:20].hex(), sequence)

        call_keys = (keys.name, keys.nodes, keys.history, keys.position)
        first = await run_script(client, PUBLISH_HISTORY, call_keys, args(1))
        second = await run_script(client, PUBLISH_HISTORY, call_keys, args(2))
        replayed = await run_script(client, PUBLISH_HISTORY, call_keys, args(2))
        older = await run_script(client, PUBLISH_HISTORY, call_keys, args(1))
        assert [int(r[2]) for r in (first, second, replayed, older)] == [1, 2, 2, -1]
        read = await run_script(client, READ_HISTORY, (keys.history, keys.position),
                                (-1, 10, 0, "unused", 60_000, 60_000))
        assert [bytes(entry[0]) for entry in read[4]] == [b"0-1", b"0-2"]
        assert int(read[1]) == 2
        # entries older than the ttl are skipped in the script: a read of N gets N live ones
        await asyncio.sleep(0.05)
        for sequence in (3, 4):
            await run_script(client, PUBLISH_HISTORY, call_keys, args(sequence))
        fresh = await run_script(client, READ_HISTORY, (keys.history, keys.position),
                                 (-1, 2, 0, "unused", 60_000, 40))
        assert [bytes(entry[0]) for entry in fresh[4]] == [b"0-3", b"0-4"] and int(fresh[5]) == 1
    finally:
        await client.aclose()

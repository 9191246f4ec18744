"""History, positions, recovery and idempotent publish, with real clients and real processes.

One ``echoctl dev`` (memory broker) and, for what crosses nodes, ``echoctl serve`` nodes on a
private ``redis-server``. Channels (tests/conftest.py): ``hist:*`` keeps 1,000 messages,
``hist-small`` 5, ``hist-angry`` runs a transforming function, ``hist-filtered`` a filter.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid as uuids
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Client, EchoProcess, RedisServer, connect, make_project

pytestmark = pytest.mark.anyio
WIRE_TESTS = True  # the memory-broker tests run on both transports (conftest.py)


def channel_name(prefix: str = "hist:") -> str:
    return prefix + uuids.uuid4().hex[:10]


async def publish_all(client: Client, channel: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    """Publish ``{"n": 0..count-1}`` in order, waiting out the per-connection rate limit."""
    return [await publish_one(client, channel, i, **extra) for i in range(count)]


async def publish_one(client: Client, channel: str, n: Any, **extra: Any) -> dict[str, Any]:
    """Publish ``{"n": n}``, waiting out the per-connection rate limit."""
    while True:
        ack = await client.call("publish", {"channel": channel, "message": {"n": n}, **extra})
        if ack["ok"] or ack["error"]["code"] != "rate_limited":
            break
        await asyncio.sleep(ack["error"]["retryAfterMs"] / 1000)
    assert ack["ok"], ack
    return ack


async def test_messages_carry_contiguous_offsets_and_one_epoch(echo_server: EchoProcess,
                                                               clients: list[Client]) -> None:
    channel = channel_name()
    sub = await connect(echo_server)
    clients.append(sub)
    ack = await sub.call("subscribe", {"channels": [channel]})
    assert ack["ok"] and ack["positions"][channel]["offset"] == 0
    epoch = ack["positions"][channel]["epoch"]
    acks = await publish_all(sub, channel, 5)
    assert [a["offset"] for a in acks] == [1, 2, 3, 4, 5] and {a["epoch"] for a in acks} == {epoch}
    got = await sub.wait_for("message", 5)
    assert [(m["offset"], m["epoch"], m["message"]["n"]) for m in got] == [
        (i + 1, epoch, i) for i in range(5)]


async def test_plain_channels_carry_no_positions(echo_server: EchoProcess,
                                                 clients: list[Client]) -> None:
    sub = await connect(echo_server)
    clients.append(sub)
    ack = await sub.call("subscribe", {"channels": ["plain"]})
    assert "positions" not in ack
    publish = await sub.call("publish", {"channel": "plain", "message": "x"})
    assert "offset" not in publish
    message = (await sub.wait_for("message"))[0]
    assert "offset" not in message and "epoch" not in message


async def test_history_reads_forwards_backwards_and_since(echo_server: EchoProcess,
                                                          clients: list[Client]) -> None:
    channel = channel_name()
    client = await connect(echo_server)
    clients.append(client)
    await publish_all(client, channel, 6)
    read = await client.call("history", {"channel": channel, "limit": 3})
    assert read["ok"] and read["offset"] == 6
    assert [p["message"]["n"] for p in read["publications"]] == [0, 1, 2]
    newest = await client.call("history", {"channel": channel, "limit": 2, "reverse": True})
    assert [p["offset"] for p in newest["publications"]] == [6, 5]
    since = await client.call("history", {"channel": channel, "since": 4})
    assert [p["offset"] for p in since["publications"]] == [5, 6]
    assert all(p["epoch"] == read["epoch"] for p in since["publications"])


async def test_history_errors_name_what_is_wrong(echo_server: EchoProcess,
                                                 clients: list[Client]) -> None:
    client = await connect(echo_server)
    clients.append(client)
    plain = await client.call("history", {"channel": "plain"})
    assert plain["error"]["code"] == "bad_request" and "keeps no history" in plain["error"]["message"]
    bad = await client.call("history", {"channel": "hist:x", "limit": 0})
    assert bad["error"]["code"] == "bad_request" and "history.limit" in bad["error"]["message"]
    token = echo_server.token(capabilities={"hist:*": ["subscribe"]})
    limited = await connect(echo_server, token=token)
    clients.append(limited)
    refused = await limited.call("history", {"channel": "hist:x"})
    assert refused["error"]["code"] == "forbidden"
    since = await client.call("subscribe", {"channels": ["hist:x"], "since": {"hist:x": {"offset": -1}}})
    assert since["error"]["code"] == "bad_request" and "offset" in since["error"]["message"]


async def test_recovery_after_a_disconnect_delivers_every_missed_message_once_in_order(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = channel_name()
    sub = await connect(echo_server, uuid="phone")
    ack = await sub.call("subscribe", {"channels": [channel]})
    position = ack["positions"][channel]
    await sub.disconnect()
    pub = await connect(echo_server)
    clients.append(pub)
    await publish_all(pub, channel, 200)
    back = await connect(echo_server, uuid="phone")
    clients.append(back)
    ack = await back.call("subscribe", {"channels": [channel], "since": {channel: position}})
    assert ack["recovered"] == {channel: True}
    assert ack["positions"][channel]["offset"] == 200
    await publish_one(pub, channel, "live")
    got = await back.wait_for("message", 201)
    await asyncio.sleep(0.2)
    assert [m["offset"] for m in back.messages] == list(range(1, 202))
    assert [m["message"]["n"] for m in got[:200]] == list(range(200))


async def test_recovery_refused_for_a_changed_epoch_or_trimmed_messages(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = channel_name()
    client = await connect(echo_server)
    clients.append(client)
    await publish_all(client, channel, 3)
    wrong = await client.call("subscribe", {"channels": [channel],
                                            "since": {channel: {"offset": 1, "epoch": "other"}}})
    assert wrong["recovered"] == {channel: False} and wrong["positions"][channel]["offset"] == 3
    await publish_one(client, channel, "after")
    await client.wait_for("message")
    assert [m["offset"] for m in client.messages] == [4]  # live from the position, nothing old

    small = await connect(echo_server)
    clients.append(small)
    ack = await small.call("subscribe", {"channels": ["hist-small"]})
    position = ack["positions"]["hist-small"]
    await small.call("unsubscribe", {"channels": ["hist-small"]})
    await publish_all(client, "hist-small", 8)  # 5 are kept: 3 were trimmed
    again = await small.call("subscribe", {"channels": ["hist-small"], "since": {"hist-small": position}})
    assert again["recovered"] == {"hist-small": False}
    await asyncio.sleep(0.2)
    assert small.messages == []


async def test_stored_messages_are_what_subscribers_received(echo_server: EchoProcess,
                                                             clients: list[Client]) -> None:
    client = await connect(echo_server)
    clients.append(client)
    before = await client.call("history", {"channel": "hist-angry", "reverse": True, "limit": 1})
    await client.call("publish", {"channel": "hist-angry", "message": {"text": "calm down"}})
    read = await client.call("history", {"channel": "hist-angry", "since": before["offset"]})
    assert [p["message"]["text"] for p in read["publications"]] == ["CALM DOWN!!!"]
    start = (await client.call("history", {"channel": "hist-filtered", "limit": 1,
                                            "reverse": True}))["offset"]
    quiet = await client.call("publish", {"channel": "hist-filtered", "message": {"text": "hello"}})
    loud = await client.call("publish", {"channel": "hist-filtered", "message": {"text": "HELLO!!"}})
    assert "filteredBy" in loud and "offset" not in loud and quiet["offset"] == start + 1
    read = await client.call("history", {"channel": "hist-filtered", "since": start})
    assert [p["message"]["text"] for p in read["publications"]] == ["hello"]


async def test_idempotent_retry_is_acknowledged_once_and_delivered_once(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = channel_name()
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": [channel, "plain"]})
    for name in (channel, "plain"):
        first = await client.call("publish", {"channel": name, "message": 1, "idempotencyKey": "k-1"})
        again = await client.call("publish", {"channel": name, "message": 1, "idempotencyKey": "k-1"})
        assert first["ok"] and "duplicate" not in first
        assert again["duplicate"] is True and again["id"] == first["id"]
        assert again.get("offset") == first.get("offset")
    other = await client.call("publish", {"channel": "plain", "message": 2, "idempotencyKey": "k-2"})
    assert "duplicate" not in other
    await client.wait_for("message", 3)
    await asyncio.sleep(0.2)
    assert [m["message"] for m in client.messages] == [1, 1, 2]  # one each, and the other key


async def test_subscribing_again_with_since_while_live_sends_nothing_twice(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = channel_name()
    client = await connect(echo_server)
    clients.append(client)
    ack = await client.call("subscribe", {"channels": [channel]})
    await publish_all(client, channel, 3)
    await client.wait_for("message", 3)
    again = await client.call("subscribe", {"channels": [channel],
                                            "since": {channel: ack["positions"][channel]}})
    assert again["recovered"] == {channel: True} and again["positions"][channel]["offset"] == 3
    await publish_one(client, channel, "live")
    await client.wait_for("message", 4)
    await asyncio.sleep(0.2)
    assert [m["offset"] for m in client.messages] == [1, 2, 3, 4]


async def test_admins_hear_new_epochs_and_metrics_count_recoveries_and_duplicates(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    admin = await connect(echo_server, admin=True)
    clients.append(admin)
    await admin.call("subscribe", {"channels": ["admin"]})
    channel = channel_name()
    client = await connect(echo_server)
    clients.append(client)
    ack = await client.call("subscribe", {"channels": [channel]})
    await client.call("publish", {"channel": channel, "message": 1, "idempotencyKey": "m"})
    await client.call("publish", {"channel": channel, "message": 1, "idempotencyKey": "m"})
    await client.call("subscribe", {"channels": [channel + "-gone"],
                                    "since": {channel + "-gone": {"offset": 9, "epoch": "old"}}})
    other = await connect(echo_server)
    clients.append(other)
    await other.call("subscribe", {"channels": [channel], "since": {channel: ack["positions"][channel]}})
    epoch = await admin.wait_for_match("status", event="history_epoch", channel=channel)
    assert epoch["epoch"] == ack["positions"][channel]["epoch"] and epoch["offset"] == 0
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(echo_server.url + "/metrics")).text
    def value(line_start: str) -> float:
        lines = [line for line in text.splitlines() if line.startswith(line_start)]
        assert lines, f"{line_start} is not in /metrics"
        return float(lines[0].rsplit(" ", 1)[1])
    assert value('echo_recoveries_total{result="recovered"}') >= 1
    assert value('echo_recoveries_total{result="not_recovered"}') >= 1
    assert value("echo_recovered_messages_total") >= 1
    assert value("echo_idempotent_duplicates_total") >= 1
    assert value("echo_history_epochs_total") >= 1
    assert value("echo_history_entries") >= 1


async def test_a_retry_while_the_first_publish_runs_waits_for_its_ack(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": ["slow"]})
    request = {"channel": "slow", "message": {"delay": 0.5}, "idempotencyKey": "while-running"}
    first, again = await asyncio.gather(client.call("publish", request),
                                        client.call("publish", request))
    assert first["ok"] and again["ok"] and again["duplicate"] is True
    assert again["id"] == first["id"]
    await client.wait_for("message")
    await asyncio.sleep(0.3)
    assert len(client.messages) == 1


# --- a client process that is killed (its TCP connection dropped, no goodbye) ---------------

CLIENT = """
import asyncio, json, sys, socketio
async def main():
    url, token, channel = sys.argv[1:4]
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, namespaces=["/test-app"], auth={"jwt": token}, transports=["websocket"])
    ack = await sio.call("subscribe", {"channels": [channel]}, namespace="/test-app")
    print(json.dumps(ack["positions"][channel]), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def subscribed_process(server: EchoProcess, channel: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    process = subprocess.Popen([sys.executable, "-c", CLIENT, server.url, server.token(), channel],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, "the client process did not subscribe"
    return process, json.loads(line)


async def test_a_killed_client_recovers_everything_published_while_it_was_gone(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = channel_name()
    process, position = subscribed_process(echo_server, channel)
    pub = await connect(echo_server)
    clients.append(pub)
    await publish_all(pub, channel, 20)
    process.send_signal(signal.SIGKILL)  # the connection is dropped, not closed by the client
    process.wait()
    await publish_all(pub, channel, 180)
    await asyncio.sleep(5)
    back = await connect(echo_server)
    clients.append(back)
    ack = await back.call("subscribe", {"channels": [channel], "since": {channel: position}})
    assert ack["recovered"] == {channel: True}
    await back.wait_for("message", 200)
    assert [m["offset"] for m in back.messages] == list(range(1, 201))


# --- across nodes, on Redis ----------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("history-nodes"))


def node(project: Path, redis: RedisServer) -> EchoProcess:
    return EchoProcess(project, env={"ECHO_REDIS_URL": redis.url}, command="serve").start()


@pytest.fixture
async def nodes(project: Path, redis_server: RedisServer) -> AsyncIterator[list[EchoProcess]]:
    started = [node(project, redis_server), node(project, redis_server)]
    yield started
    for server in started:
        server.stop()


@pytest.mark.redis
async def test_two_nodes_publishing_at_once_give_every_subscriber_one_order(
        nodes: list[EchoProcess], clients: list[Client]) -> None:
    channel = channel_name()
    subs = [await connect(server) for server in nodes for _ in range(2)]
    clients.extend(subs)
    for sub in subs:
        await sub.call("subscribe", {"channels": [channel]})
    pubs = [await connect(server) for server in nodes]
    clients.extend(pubs)
    acks = await asyncio.gather(*(publish_all(pub, channel, 50) for pub in pubs))
    offsets = sorted(a["offset"] for batch in acks for a in batch)
    assert offsets == list(range(1, 101))
    for sub in subs:
        await sub.wait_for("message", 100)
    orders = [[(m["offset"], m["id"]) for m in sub.messages] for sub in subs]
    assert [o for o, _ in orders[0]] == list(range(1, 101))
    assert all(order == orders[0] for order in orders)


@pytest.mark.redis
async def test_a_client_whose_node_is_killed_recovers_on_another_node(
        nodes: list[EchoProcess], clients: list[Client]) -> None:
    channel = channel_name()
    process, position = subscribed_process(nodes[0], channel)
    pub = await connect(nodes[1])
    clients.append(pub)
    await publish_all(pub, channel, 10)
    nodes[0].kill()  # SIGKILL: the node under the subscriber is gone
    process.kill()
    process.wait()
    await publish_all(pub, channel, 90)
    back = await connect(nodes[1])
    clients.append(back)
    ack = await back.call("subscribe", {"channels": [channel], "since": {channel: position}})
    assert ack["recovered"] == {channel: True}
    await back.wait_for("message", 100)
    assert [m["offset"] for m in back.messages] == list(range(1, 101))


@pytest.mark.redis
async def test_an_empty_redis_changes_the_epoch_and_recovery_says_so(
        project: Path, tmp_path: Path, clients: list[Client]) -> None:
    redis = RedisServer(tmp_path).start()
    server = node(project, redis)
    try:
        channel = channel_name()
        client = await connect(server)
        clients.append(client)
        ack = await client.call("subscribe", {"channels": [channel]})
        await publish_all(client, channel, 3)
        old = {"offset": 3, "epoch": ack["positions"][channel]["epoch"]}
        redis.stop()
        redis.start()  # empty: every stream and position is gone
        await asyncio.sleep(1.5)  # the node reconnects and re-subscribes
        later = await connect(server)
        clients.append(later)
        again = await later.call("subscribe", {"channels": [channel], "since": {channel: old}})
        assert again["recovered"] == {channel: False}
        assert again["positions"][channel]["epoch"] != old["epoch"]
        published = await later.call("publish", {"channel": channel, "message": "new"})
        assert published["offset"] == 1 and published["epoch"] == again["positions"][channel]["epoch"]
    finally:
        server.stop()
        redis.stop()


@pytest.mark.redis
async def test_idempotency_holds_across_nodes(nodes: list[EchoProcess], clients: list[Client]) -> None:
    channel = channel_name()
    sub = await connect(nodes[0])
    clients.append(sub)
    await sub.call("subscribe", {"channels": [channel]})
    a = await connect(nodes[0])
    b = await connect(nodes[1])
    clients.extend([a, b])
    first = await a.call("publish", {"channel": channel, "message": "once", "idempotencyKey": "same"})
    again = await b.call("publish", {"channel": channel, "message": "once", "idempotencyKey": "same"})
    assert again["duplicate"] is True and again["offset"] == first["offset"] == 1
    await sub.wait_for("message")
    await asyncio.sleep(0.3)
    assert len(sub.messages) == 1


@pytest.mark.redis
async def test_recovering_while_another_node_publishes_misses_and_doubles_nothing(
        nodes: list[EchoProcess], clients: list[Client]) -> None:
    """Frames numbered before the history read may still be on their way from Redis when the
    recovered connection goes live: each reaches it once."""
    channel = channel_name()
    pub = await connect(nodes[1])
    clients.append(pub)
    publishing = asyncio.create_task(publish_all(pub, channel, 150))
    readers = []
    for _ in range(10):
        await asyncio.sleep(0.05)
        reader = await connect(nodes[0])
        clients.append(reader)
        ack = await reader.call("subscribe", {"channels": [channel],
                                              "since": {channel: {"offset": 0, "epoch": "x"}}})
        # a wrong epoch: not recovered, live from the position the ack names
        top = ack["positions"][channel]["offset"]
        again = await connect(nodes[0])
        clients.append(again)
        recovered = await again.call("subscribe", {"channels": [channel], "since": {
            channel: {"offset": max(0, top - 5), "epoch": ack["positions"][channel]["epoch"]}}})
        assert recovered["recovered"] == {channel: True}
        readers.append((reader, top, again, max(0, top - 5)))
    await publishing
    for reader, top, again, since in readers:
        await reader.wait_for("message", 150 - top)
        await again.wait_for("message", 150 - since)
    await asyncio.sleep(0.5)
    for reader, top, again, since in readers:
        assert [m["offset"] for m in reader.messages] == list(range(top + 1, 151))
        assert [m["offset"] for m in again.messages] == list(range(since + 1, 151))


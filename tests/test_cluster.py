"""Several `echoctl serve` nodes on one real Redis act as one, and survive Redis restarting.

Redis is a redis-server process, then Redis in a container (testcontainers).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import (
    TEST_ASSOCIATIONS,
    Client,
    EchoProcess,
    RedisServer,
    connect,
    make_project,
)
from tests.test_docker import ContainerRedis

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

AnyRedis = RedisServer | ContainerRedis


@pytest.fixture(scope="module", params=["process", "container"])
def redis_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AnyRedis]:
    """Every test here runs twice: on a redis-server process, and on Redis in a container
    started by testcontainers (skipped, saying why, where no Docker engine answers)."""
    if request.param == "process":
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
        yield server
        server.stop()
        return
    container = ContainerRedis()
    try:
        yield container.start()
    finally:
        container.remove()


def start_node(project: Path, redis: AnyRedis) -> EchoProcess:
    return EchoProcess(project, env={"ECHO_REDIS_URL": redis.url}, command="serve").start()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, redis_server: AnyRedis) -> Path:
    # one per Redis variant; its parent also holds the variant's stale-project
    return make_project(tmp_path_factory.mktemp("cluster") / "project")


@pytest.fixture(scope="module")
def nodes(project: Path, redis_server: AnyRedis) -> Iterator[list[EchoProcess]]:
    started = [start_node(project, redis_server) for _ in range(3)]
    yield started
    for node in started:
        node.stop()


async def put_associations(node: EchoProcess, document: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.put(
            node.url + "/associations", json=document,
            headers={"authorization": "Bearer " + node.management_token()},
        )


def with_plain_chain(*functions: str) -> dict[str, Any]:
    document = json.loads(json.dumps(TEST_ASSOCIATIONS))
    document["applications"]["test-app"]["channels"][0]["functionNames"] = list(functions)
    return document


async def metric(node: EchoProcess, name: str) -> float:
    """A counter without labels from a node's /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(node.url + "/metrics", headers=node.operator())).text
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} is not in /metrics"
    return float(values[0])


async def until_delivered(publisher: Client, listener: Client, channel: str, message: Any,
                          expected: Any, timeout: float = 10) -> float:
    """Publish until ``listener`` receives ``expected``; return how long it took."""
    started = time.monotonic()
    while True:
        await publisher.call("publish", {"channel": channel, "message": message})
        await asyncio.sleep(0.05)
        if any(m["message"] == expected for m in listener.messages):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{expected!r} never arrived; got {listener.messages[-3:]}")


async def test_publish_on_one_node_reaches_every_node_once_transformed_once(
    nodes: list[EchoProcess], clients: list[Client]
) -> None:
    subscribers = [await connect(node) for node in nodes]
    clients.extend(subscribers)
    for subscriber in subscribers:
        await subscriber.call("subscribe", {"channels": ["chain"]})
    publisher = subscribers[0]
    ack = await publisher.call("publish", {"channel": "chain", "message": {"text": "x"}})
    assert ack["ok"] and ack["delivered"]
    for subscriber in subscribers:
        [message] = await subscriber.wait_for("message")
        # tag-a then tag-b, once: had a node run the chain again it would read x+a+b+a+b
        assert message["message"]["text"] == "x+a+b"
        assert message["id"] == ack["id"]
    await asyncio.sleep(0.3)
    assert [len(s.messages) for s in subscribers] == [1, 1, 1], "a node delivered twice"


async def test_other_nodes_see_a_channel_in_the_order_its_node_delivered_it(
    nodes: list[EchoProcess], clients: list[Client]
) -> None:
    """Four publishers race on one node; every node's subscriber sees the same order (the
    channel's sequence): a node sends to Redis from one outbox, in the order it delivered."""
    listeners = [await connect(node) for node in nodes]
    publishers = [await connect(nodes[0]) for _ in range(4)]
    clients.extend(listeners + publishers)
    for listener in listeners:
        await listener.call("subscribe", {"channels": ["plain"]})
    acks = await asyncio.gather(*(
        publisher.call("publish", {"channel": "plain", "message": {"from": p, "n": n}})
        for n in range(80) for p, publisher in enumerate(publishers)))
    assert all(ack["ok"] for ack in acks), [a for a in acks if not a["ok"]][:3]
    for listener in listeners:
        received = await listener.wait_for("message", len(acks), timeout=15)
        seqs = [message["seq"] for message in received]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(acks)
    orders = [[m["id"] for m in listener.messages] for listener in listeners]
    assert orders[1] == orders[0] and orders[2] == orders[0]


async def test_presence_and_admin_status_cross_nodes(
    nodes: list[EchoProcess], clients: list[Client]
) -> None:
    watcher = await connect(nodes[2], uuid="watcher")
    admin = await connect(nodes[1], uuid="ops", admin=True)
    clients += [watcher, admin]
    await watcher.call("subscribe", {"channels": ["plain"], "withPresence": True})
    lurker = await connect(nodes[0], uuid="lurker")  # not withPresence: not announced (Ekko)
    visitor = await connect(nodes[0], uuid="visitor")
    await lurker.call("subscribe", {"channels": ["plain"]})
    await visitor.call("subscribe", {"channels": ["plain"], "withPresence": True})
    await visitor.disconnect()
    await lurker.disconnect()
    presence = await watcher.wait_for("presence", 3)
    await asyncio.sleep(0.3)
    assert [(p["eventName"], p["uuid"]) for p in watcher.received["presence"]] == [
        ("joined", "watcher"), ("joined", "visitor"), ("left", "visitor")]
    assert all(p["presenceChannel"] == "plain_presence" for p in presence)
    await admin.wait_for_match("status", event="disconnection", uuid="lurker")
    visitor_events = [s["event"] for s in admin.received["status"] if s["uuid"] == "visitor"]
    assert visitor_events == ["connection", "joined", "subscribe", "left", "disconnection"]
    lurker_events = [s["event"] for s in admin.received["status"] if s["uuid"] == "lurker"]
    assert lurker_events == ["connection", "subscribe", "disconnection"]


async def test_put_on_one_node_changes_the_chain_on_the_others_within_a_second(
    nodes: list[EchoProcess], redis_server: AnyRedis, project: Path, clients: list[Client]
) -> None:
    listener = await connect(nodes[0])
    publisher = await connect(nodes[0])
    clients += [listener, publisher]
    await listener.call("subscribe", {"channels": ["plain"]})

    reply = await put_associations(nodes[1], with_plain_chain("demo-angry"))
    assert reply.status_code == 200, reply.text
    put_at = time.monotonic()
    await until_delivered(publisher, listener, "plain", "abc", "ABC!!!", timeout=1.0)
    assert time.monotonic() - put_at < 1.0

    # a node started after the PUT, from a project whose file still has the old document,
    # uses the current version from Redis
    stale = make_project(project.parent / "stale-project")
    late = start_node(stale, redis_server)
    try:
        late_client = await connect(late)
        clients.append(late_client)
        await late_client.call("subscribe", {"channels": ["plain"]})
        ack = await late_client.call("publish", {"channel": "plain", "message": "late"})
        assert ack["delivered"]
        [message] = await late_client.wait_for("message")
        assert message["message"] == "LATE!!!"
    finally:
        late.stop()
    assert (await put_associations(nodes[1], TEST_ASSOCIATIONS)).status_code == 200


async def test_redis_restart_resumes_delivery_and_sync_without_restarting_nodes(
    nodes: list[EchoProcess], redis_server: AnyRedis, clients: list[Client]
) -> None:
    local = await connect(nodes[0], uuid="local")
    remote = await connect(nodes[1], uuid="remote")
    clients += [local, remote]
    for client in (local, remote):
        await client.call("subscribe", {"channels": ["plain"]})
    await until_delivered(local, remote, "plain", "before", "before")

    redis_server.stop()
    try:
        # each node keeps serving its own clients; the other nodes miss what is published
        ack = await local.call("publish", {"channel": "plain", "message": "during"})
        assert ack["ok"] and ack["delivered"]
        assert (await local.wait_for("message", 2))[-1]["message"] == "during"
        async with httpx.AsyncClient() as http:
            ready = await http.get(nodes[0].url + "/ready", headers=nodes[0].operator())
        assert ready.status_code == 503
        assert any(p.startswith("redis ") and "unreachable" in p
                   for p in ready.json()["problems"]), ready.json()
        reply = await put_associations(nodes[1], with_plain_chain("demo-backwards"))
        assert reply.status_code == 503 and "nothing was changed" in reply.text
    finally:
        redis_server.start()

    waited = await until_delivered(local, remote, "plain", "after", "after", timeout=15)
    assert "during" not in [m["message"] for m in remote.messages]
    # what the other node missed is counted on both sides, never silent: the publisher could
    # not send it, and the receiver saw the gap in the publisher's sequence
    assert await metric(nodes[0], "echo_redis_publish_failures_total") >= 1
    assert await metric(nodes[1], "echo_broker_missed_frames_total") >= 1
    reply = await put_associations(nodes[2], with_plain_chain("demo-backwards"))
    assert reply.status_code == 200, reply.text
    await until_delivered(local, local, "plain", "abc", "cba", timeout=2)
    assert all(node.alive() for node in nodes)
    assert waited < 15
    assert (await put_associations(nodes[2], TEST_ASSOCIATIONS)).status_code == 200


async def test_metrics_count_connections_messages_and_functions(
    nodes: list[EchoProcess], clients: list[Client]
) -> None:
    client = await connect(nodes[0])
    clients.append(client)
    await client.call("publish", {"channel": "raise", "message": "x"})
    async with httpx.AsyncClient() as http:
        text = (await http.get(nodes[0].url + "/metrics", headers=nodes[0].operator())).text
    assert 'echo_connections{app="test-app"}' in text
    assert 'echo_messages_published_total{app="test-app"}' in text
    assert 'echo_function_errors_total{function="fail-raise",kind="raised"} 1.0' in text
    assert "echo_function_duration_seconds_bucket" in text
    assert "echo_redis_reconnects_total" in text

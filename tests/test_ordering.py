"""In-order delivery with concurrent chains, the ordering switch, and back-pressure."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator

import pytest

from tests.conftest import Client, EchoProcess, connect, make_project

pytestmark = pytest.mark.anyio

MESSAGES = 1000


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    project = make_project(tmp_path_factory.mktemp("ordering"))
    server = EchoProcess(project, env={"ECHO_MAX_WORKERS": "16", "ECHO_PUBLISH_RATE": "0"}).start()
    yield server
    server.stop()


async def publish_all(publisher: Client, channel: str, delays: list[float]) -> list[dict]:
    """Publish every message without waiting for the previous ack (bounded by the count)."""
    return await asyncio.gather(*(
        publisher.call("publish", {"channel": channel, "message": {"n": n, "delay": delay}},
                       timeout=60)
        for n, delay in enumerate(delays)
    ))


async def test_a_thousand_messages_with_random_latency_arrive_in_publish_order(
    busy_server: EchoProcess, clients: list[Client]
) -> None:
    rng = random.Random(7)
    delays = [rng.uniform(0, 0.05) for _ in range(MESSAGES)]
    subscribers = [await connect(busy_server) for _ in range(3)]
    publisher = await connect(busy_server)
    clients += [*subscribers, publisher]
    for subscriber in subscribers:
        await subscriber.call("subscribe", {"channels": ["slow"]})
    started = time.monotonic()
    acks = await publish_all(publisher, "slow", delays)
    for subscriber in subscribers:
        await subscriber.wait_for("message", MESSAGES, timeout=60)
    elapsed = time.monotonic() - started
    assert all(a["ok"] and a["delivered"] for a in acks)
    for subscriber in subscribers:
        assert [m["message"]["n"] for m in subscriber.messages] == list(range(MESSAGES))
        seqs = [m["seq"] for m in subscriber.messages]
        assert seqs == sorted(seqs) and len(set(seqs)) == MESSAGES
    sequential = sum(delays)  # what one-at-a-time invocation would take at the least
    print(f"\nordered: {MESSAGES} messages in {elapsed:.2f}s "
          f"({MESSAGES / elapsed:.0f}/s); sequential would need >= {sequential:.1f}s")
    assert elapsed < sequential / 2, "chains did not run concurrently"


async def test_unordered_channel_delivers_as_soon_as_each_chain_finishes(
    busy_server: EchoProcess, clients: list[Client]
) -> None:
    rng = random.Random(11)
    delays = [rng.uniform(0, 0.05) for _ in range(200)]
    subscriber = await connect(busy_server)
    publisher = await connect(busy_server)
    clients += [subscriber, publisher]
    await subscriber.call("subscribe", {"channels": ["slow-unordered"]})
    acks = await publish_all(publisher, "slow-unordered", delays)
    received = await subscriber.wait_for("message", len(delays), timeout=60)
    assert all(a["delivered"] for a in acks)
    order = [m["message"]["n"] for m in received]
    assert sorted(order) == list(range(len(delays))), "a message was lost or duplicated"
    assert order != sorted(order), "with random latencies, unordered delivery reorders"


@pytest.fixture(scope="module")
def small_buffer_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    project = make_project(tmp_path_factory.mktemp("backpressure"))
    env = {"ECHO_MAX_PENDING_PER_CHANNEL": "20", "ECHO_PUBLISH_RATE": "0"}
    server = EchoProcess(project, env=env).start()
    yield server
    server.stop()


async def test_a_full_channel_refuses_with_overloaded_and_recovers(
    small_buffer_server: EchoProcess, clients: list[Client]
) -> None:
    publisher = await connect(small_buffer_server)
    clients.append(publisher)
    await publisher.call("subscribe", {"channels": ["slow"]})
    acks = await publish_all(publisher, "slow", [0.2] * 60)
    refused = [a for a in acks if not a["ok"]]
    accepted = [a for a in acks if a["ok"]]
    assert refused and all(a["error"]["code"] == "overloaded" for a in refused)
    assert "limit 20" in refused[0]["error"]["message"]
    assert len(accepted) >= 20
    received = await publisher.wait_for("message", len(accepted), timeout=30)
    assert sorted(m["seq"] for m in received) == sorted(a["seq"] for a in accepted)
    # once drained, the channel takes messages again
    assert (await publisher.call("publish", {"channel": "slow", "message": {"delay": 0}}))["ok"]

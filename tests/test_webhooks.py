"""Webhooks to a real HTTP receiver (a threaded ``http.server`` on loopback): signed, batched,
retried with back-off when the receiver fails, and, on Redis, delivered by another node
after the node that queued them was SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from echo.config import ConfigError, load_settings
from echo.core.webhooks import LEASE, signature
from tests.conftest import Client, EchoProcess, RedisServer, connect, make_project

pytestmark = pytest.mark.anyio

HOOK_SECRET = "webhook-secret-0123456789abcdef-0123"


class Receiver:
    """Records every request; answers ``fail`` requests with 500 first (or all, while down)."""

    def __init__(self, hang: float = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.fail = 0
        self.down = False
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(hang)  # a receiver that takes its time (or never answers in time)
                failing = receiver.down or receiver.fail > 0
                if not receiver.down and receiver.fail > 0:
                    receiver.fail -= 1
                receiver.requests.append({"headers": dict(self.headers), "body": body,
                                          "failed": failing})
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict[str, Any]]:
        """The events of the requests answered 2xx."""
        return [event for r in self.requests if not r["failed"]
                for event in json.loads(r["body"])["events"]]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    started = Receiver()
    yield started
    started.stop()


def hooks_env(receiver: Receiver, events: list[str]) -> dict[str, str]:
    return {"ECHO_WEBHOOKS": json.dumps({"test-app": [
        {"url": receiver.url, "events": events, "secret": HOOK_SECRET}]})}


async def wait_until(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path, receiver: Receiver) -> Iterator[EchoProcess]:
    started = EchoProcess(make_project(tmp_path), env=hooks_env(
        receiver, ["connection", "subscribe", "publish", "disconnection"])).start()
    yield started
    started.stop()


async def test_events_arrive_signed_and_batched(server: EchoProcess, receiver: Receiver,
                                                clients: list[Client]) -> None:
    client = await connect(server, uuid="ada")
    clients.append(client)
    await client.call("subscribe", {"channels": ["plain"]})
    for n in range(3):
        await client.call("publish", {"channel": "plain", "message": n})
    await client.disconnect()
    await wait_until(lambda: [e["event"] for e in receiver.events()].count("publish") == 3
                     and "disconnection" in [e["event"] for e in receiver.events()])
    for request in receiver.requests:
        headers = {k.lower(): v for k, v in request["headers"].items()}
        assert headers["echo-webhook-signature"] == signature(
            HOOK_SECRET, headers["echo-webhook-timestamp"], request["body"])
        assert json.loads(request["body"])["app"] == "test-app"
    events = receiver.events()
    assert [e["message"] for e in events if e["event"] == "publish"] == [0, 1, 2]
    subscribed = next(e for e in events if e["event"] == "subscribe")
    assert subscribed["uuid"] == "ada" and subscribed["channels"] == ["plain"]
    assert len({e["id"] for e in events}) == len(events)


async def test_a_failing_receiver_gets_them_again_and_admins_hear_of_it(
        server: EchoProcess, receiver: Receiver, clients: list[Client]) -> None:
    admin = await connect(server, admin=True)
    clients.append(admin)
    await admin.call("subscribe", {"channels": ["admin"]})
    receiver.fail = 3
    client = await connect(server, uuid="bob")
    clients.append(client)
    await client.call("publish", {"channel": "plain", "message": "retried"})
    await wait_until(lambda: any(e.get("message") == "retried" for e in receiver.events()))
    assert sum(r["failed"] for r in receiver.requests) == 3
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == len(set(ids))  # every event once (by id) among the accepted requests
    failure = await admin.wait_for_match("status", event="webhook_failed")
    assert failure["url"] == receiver.url and "500" in failure["error"]
    async with httpx.AsyncClient(trust_env=False) as http:
        text = (await http.get(server.url + "/metrics")).text
    assert 'echo_webhook_failures_total{kind="retried"} 3.0' in text


async def test_a_channel_is_occupied_by_its_first_subscriber_and_vacated_by_its_last(
        tmp_path: Path, receiver: Receiver, clients: list[Client]) -> None:
    server = EchoProcess(make_project(tmp_path), env=hooks_env(
        receiver, ["channel_occupied", "channel_vacated"])).start()
    try:
        first, second = await connect(server), await connect(server)
        clients.extend([first, second])
        for client in (first, second):
            await client.call("subscribe", {"channels": ["room:busy"]})
        for client in (first, second):
            await client.call("unsubscribe", {"channels": ["room:busy"]})
        await wait_until(lambda: len(receiver.events()) >= 2)
        await asyncio.sleep(0.5)
        assert [(e["event"], e["channel"]) for e in receiver.events()] == [
            ("channel_occupied", "room:busy"), ("channel_vacated", "room:busy")]
    finally:
        server.stop()


@pytest.mark.redis
async def test_events_keep_their_order_batch_up_and_a_hung_receiver_delays_only_its_own(
        tmp_path: Path, receiver: Receiver, redis_server: RedisServer,
        clients: list[Client]) -> None:
    hung = Receiver(hang=20)
    events = ["connection", "subscribe", "unsubscribe", "disconnection"]
    hooks = {"test-app": [{"url": hung.url, "events": events, "secret": HOOK_SECRET},
                          {"url": receiver.url, "events": events, "secret": HOOK_SECRET}]}
    server = EchoProcess(make_project(tmp_path), command="serve", env={
        "ECHO_REDIS_URL": redis_server.url, "ECHO_WEBHOOKS": json.dumps(hooks)}).start()
    try:
        people = [await connect(server, uuid=f"user-{n}") for n in range(20)]
        clients.extend(people)
        for person in people:
            await person.call("subscribe", {"channels": ["plain"]})
        for person in people:
            await person.call("unsubscribe", {"channels": ["plain"]})
        for person in people:
            await person.disconnect()
        await wait_until(lambda: len(receiver.events()) >= 80, timeout=10)  # not held by `hung`
        for n in range(20):
            seen = [e["event"] for e in receiver.events() if e.get("uuid") == f"user-{n}"]
            assert seen == events, (n, seen)
        assert max(len(json.loads(r["body"])["events"]) for r in receiver.requests) > 1
    finally:
        server.stop()
        hung.stop()
        with redis.Redis.from_url(redis_server.url) as store:
            store.flushall()


@pytest.mark.redis
async def test_occupied_and_vacated_fire_once_per_turn_across_nodes_joining_at_once(
        tmp_path: Path, receiver: Receiver, redis_server: RedisServer,
        clients: list[Client]) -> None:
    project = make_project(tmp_path)
    env = {"ECHO_REDIS_URL": redis_server.url, "ECHO_NODE_LIVENESS": "3",
           **hooks_env(receiver, ["channel_occupied", "channel_vacated"])}
    nodes = [EchoProcess(project, env=env, command="serve").start() for _ in range(2)]
    try:
        crowd = [await connect(nodes[n % 2]) for n in range(8)]
        clients.extend(crowd)
        rounds = [f"room:turn-{n}" for n in range(3)]
        for channel in rounds:  # eight joins at once on two nodes, then eight leaves at once
            await asyncio.gather(*(c.call("subscribe", {"channels": [channel]}) for c in crowd))
            await asyncio.gather(*(c.call("unsubscribe", {"channels": [channel]}) for c in crowd))
        await wait_until(lambda: len(receiver.events()) >= 2 * len(rounds))
        await asyncio.sleep(1)
        seen = [(e["event"], e["channel"]) for e in receiver.events()]
        for channel in rounds:
            assert [event for event, where in seen if where == channel] == [
                "channel_occupied", "channel_vacated"], seen

        # a node dies holding a channel's only subscriber: its count stops counting once its
        # liveness is over, so the next subscriber occupies the channel again
        lonely = await connect(nodes[1])
        await lonely.call("subscribe", {"channels": ["room:orphaned"]})
        await wait_until(lambda: ("channel_occupied", "room:orphaned") in [
            (e["event"], e["channel"]) for e in receiver.events()])
        nodes[1].kill()
        await asyncio.sleep(3.5)
        await crowd[0].call("subscribe", {"channels": ["room:orphaned"]})
        await wait_until(lambda: [(e["event"], e["channel"]) for e in receiver.events()].count(
            ("channel_occupied", "room:orphaned")) == 2)
    finally:
        for node in nodes:
            node.stop()
        # the events the stopped nodes left queued (their last vacated) would otherwise be
        # sent by the next test's nodes, to its receiver
        with redis.Redis.from_url(redis_server.url) as store:
            store.flushall()


@pytest.mark.redis
async def test_pending_webhooks_survive_the_node_that_queued_them(
        tmp_path: Path, receiver: Receiver, redis_server: RedisServer,
        clients: list[Client]) -> None:
    project = make_project(tmp_path)
    env = {"ECHO_REDIS_URL": redis_server.url, **hooks_env(receiver, ["publish"])}
    first = EchoProcess(project, env=env, command="serve").start()
    second = None
    try:
        receiver.down = True
        client = await connect(first)
        clients.append(client)
        for n in range(5):
            await client.call("publish", {"channel": "plain", "message": f"kept-{n}"})
        await wait_until(lambda: receiver.requests)  # the first node tried, and failed
        first.kill()
        await client.disconnect()
        receiver.down = False
        second = EchoProcess(project, env=env, command="serve").start()
        # due after their back-off, or, if the killed node had just claimed a batch, once its
        # lease (30 s) runs out
        await wait_until(lambda: len([e for e in receiver.events() if e["event"] == "publish"]) >= 5,
                         timeout=LEASE + 20)
        once = {e["id"]: e["message"] for e in receiver.events() if e["event"] == "publish"}
        assert list(once.values()) == [f"kept-{n}" for n in range(5)]  # once each, in order
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_a_bad_webhook_setting_names_what_is_wrong(tmp_path: Path) -> None:
    for value, wanted in (
        ('{"app": [{"url": "ftp://x", "events": ["publish"], "secret": "' + "s" * 32 + '"}]}',
         "ECHO_WEBHOOKS.app[0].url"),
        ('{"app": [{"url": "http://x", "events": ["nope"], "secret": "' + "s" * 32 + '"}]}',
         "ECHO_WEBHOOKS.app[0].events"),
        ('{"app": [{"url": "http://x", "events": ["publish"], "secret": "short"}]}',
         "ECHO_WEBHOOKS.app[0].secret"),
        ("not json", "ECHO_WEBHOOKS"),
    ):
        with pytest.raises(ConfigError) as refused:
            load_settings(tmp_path, {"ECHO_WEBHOOKS": value, "ECHO_SECRET": "x" * 32})
        assert wanted in str(refused.value)

"""The talk's demo with real python-socketio clients: transforms, chains, filters, presence."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import websockets

from tests.conftest import Client, EchoProcess, connect

pytestmark = pytest.mark.anyio
WIRE_TESTS = True  # every test here runs on both transports (conftest.py)


async def test_boring_channel_passes_through_to_every_subscriber(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    alice = await connect(echo_server, "chat-demo", uuid="alice")
    bob = await connect(echo_server, "chat-demo", uuid="bob")
    clients += [alice, bob]
    for client in (alice, bob):
        assert await client.call("subscribe", {"channels": ["boring"]}) == {
            "ok": True, "channels": ["boring"]}
    ack = await alice.call("publish", {"channel": "boring", "message": {"text": "hi"}})
    assert ack["ok"] is True and ack["delivered"] is True
    for client in (alice, bob):
        [delivered] = await client.wait_for("message")
        assert delivered["channel"] == "boring"
        assert delivered["message"] == {"text": "hi"}
        assert delivered["uuid"] == "alice"
        assert delivered["id"] == ack["id"] and delivered["seq"] == ack["seq"]
        assert isinstance(delivered["ts"], int)


@pytest.mark.parametrize(
    ("channel", "sent", "expected"),
    [
        ("angry", "hello", "HELLO!!!"),
        ("backwards", "hello", "olleh"),
        ("robot", "hi", "01101000 01101001"),
        ("emoji", "hello", "\N{ANGRY FACE} HELLO!!! \N{ANGRY FACE}"),
    ],
)
async def test_demo_channels_transform_in_transit(
    echo_server: EchoProcess, clients: list[Client], channel: str, sent: str, expected: str
) -> None:
    publisher = await connect(echo_server, "chat-demo", uuid="alice")
    subscriber = await connect(echo_server, "chat-demo", uuid="bob")
    clients += [publisher, subscriber]
    await subscriber.call("subscribe", {"channels": [channel]})
    ack = await publisher.call("publish", {"channel": channel, "message": {"text": sent}})
    assert ack["ok"], ack
    [delivered] = await subscriber.wait_for("message")
    assert delivered["message"] == {"text": expected}


async def test_chain_runs_functions_in_order_with_context(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server, uuid="carol")
    clients.append(client)
    await client.call("subscribe", {"channels": ["chain"]})
    await client.call("publish", {"channel": "chain", "message": {"text": "x"}})
    [delivered] = await client.wait_for("message")
    assert delivered["message"] == {"text": "x+a+b", "seenBy": ["test-app", "chain", "carol"]}


async def test_filter_drops_message_and_tells_publisher(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": ["filtered"]})
    dropped = await client.call("publish", {"channel": "filtered", "message": "STOP SHOUTING"})
    assert dropped["ok"] is True
    assert dropped["delivered"] is False and dropped["filteredBy"] == "demo-filter-shouting"
    kept = await client.call("publish", {"channel": "filtered", "message": "calm words"})
    assert kept["delivered"] is True
    [delivered] = await client.wait_for("message")
    assert delivered["message"] == "calm words"
    assert delivered["seq"] == dropped["seq"] + 1


async def test_glob_pattern_and_exact_channel(echo_server: EchoProcess, clients: list[Client]) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": ["room:lobby", "room:exact", "roomy"]})
    await client.call("publish", {"channel": "room:lobby", "message": "abc"})
    await client.call("publish", {"channel": "room:exact", "message": "A"})
    await client.call("publish", {"channel": "roomy", "message": "abc"})
    got = {m["channel"]: m["message"] for m in await client.wait_for("message", 3)}
    # room:* matches by glob, room:exact wins over the pattern, roomy is no prefix match
    assert got == {"room:lobby": "cba", "room:exact": "01000001", "roomy": "abc"}


async def test_unsubscribe_stops_delivery(echo_server: EchoProcess, clients: list[Client]) -> None:
    listener = await connect(echo_server)
    publisher = await connect(echo_server)
    clients += [listener, publisher]
    await listener.call("subscribe", {"channels": ["plain"]})
    assert await listener.call("unsubscribe", {"channels": ["plain", "never-joined"]}) == {
        "ok": True, "channels": ["plain", "never-joined"]}
    await publisher.call("subscribe", {"channels": ["plain"]})
    await publisher.call("publish", {"channel": "plain", "message": 1})
    await publisher.wait_for("message")
    assert listener.messages == []


async def test_presence_joined_and_left(echo_server: EchoProcess, clients: list[Client]) -> None:
    watcher = await connect(echo_server, uuid="watcher")
    clients.append(watcher)
    await watcher.call("subscribe", {"channels": ["plain"], "withPresence": True})
    lurker = await connect(echo_server, uuid="lurker")
    await lurker.call("subscribe", {"channels": ["plain"]})  # no withPresence: not announced
    visitor = await connect(echo_server, uuid="visitor")
    await visitor.call("subscribe", {"channels": ["plain"], "withPresence": True})
    await visitor.disconnect()
    await lurker.disconnect()
    events = await watcher.wait_for("presence", 3)
    await asyncio.sleep(0.2)
    announced = {"channel": "plain", "presenceChannel": "plain_presence"}
    assert watcher.received["presence"] == [
        {"eventName": "joined", **announced, "uuid": "watcher"},
        {"eventName": "joined", **announced, "uuid": "visitor"},
        {"eventName": "left", **announced, "uuid": "visitor"},
    ] == events


async def test_admin_gets_status_events_and_users_cannot_join_admin(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    admin = await connect(echo_server, uuid="ops", admin=True)
    clients.append(admin)
    user = await connect(echo_server, uuid="mallory")
    clients.append(user)
    refused = await user.call("subscribe", {"channels": ["admin"]})
    assert refused["ok"] is False and refused["error"]["code"] == "forbidden"
    await user.disconnect()
    statuses = await admin.wait_for("status", 2)
    seen = [(s["event"], s["uuid"]) for s in statuses]
    assert seen == [("connection", "mallory"), ("disconnection", "mallory")]  # not its own
    # Ekko's shape is kept too: {message: {event, app, uuid, admin}}
    connection = next(s for s in statuses if s["event"] == "connection" and s["uuid"] == "mallory")
    assert connection["message"] == {
        "event": "connection", "app": "test-app", "uuid": "mallory", "admin": False}
    assert user.received["status"] == []


async def test_websocket_and_polling_subscribers_of_one_channel_get_every_message_in_order(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    import socketio

    ws_client = await connect(echo_server)
    clients.append(ws_client)
    polling = socketio.AsyncClient(reconnection=False)
    got: list[dict] = []
    polling.on("message", got.append, namespace="/test-app")
    await polling.connect(echo_server.url, namespaces=["/test-app"],
                          auth={"jwt": echo_server.token()}, transports=["polling"])
    try:
        await polling.call("subscribe", {"channels": ["mixed"]}, namespace="/test-app")
        await ws_client.call("subscribe", {"channels": ["mixed"]})
        for n in range(20):
            await ws_client.call("publish", {"channel": "mixed", "message": n})
        received = await ws_client.wait_for("message", 20)
        assert [m["message"] for m in received] == list(range(20))
        deadline = asyncio.get_running_loop().time() + 5
        while len(got) < 20:
            assert asyncio.get_running_loop().time() < deadline, got
            await asyncio.sleep(0.02)
        assert [m["message"] for m in got] == list(range(20))
    finally:
        await polling.disconnect()


async def test_idle_connections_outlive_several_heartbeats_and_silent_ones_are_cut_off(
    tmp_path: Path,
) -> None:
    """An idle client that answers pings stays (regression: with pings on the direct path,
    engine.io's writer once closed every idle connection after 45 s); a client that sends
    nothing, not even pongs, is disconnected after ping_interval + ping_timeout."""
    from tests.conftest import EchoProcess, make_project

    server = EchoProcess(make_project(tmp_path), command="serve",
                         env={"ECHO_PING_INTERVAL": "1", "ECHO_PING_TIMEOUT": "1"}).start()
    try:
        idle = await connect(server, uuid="idle")
        await idle.call("subscribe", {"channels": ["plain"], "withPresence": True})
        silent = await websockets.connect(
            f"ws://127.0.0.1:{server.port}/socket.io/?EIO=4&transport=websocket")
        await silent.recv()  # engine.io open; from here on it never answers a ping
        await silent.send("40/test-app," + json.dumps({"jwt": server.token(), "uuid": "mute"}))
        await silent.send('42/test-app,["subscribe",{"channels":["plain"],"withPresence":true}]')
        await idle.wait_for_match("presence", eventName="joined", uuid="mute")
        started = time.monotonic()
        left = await idle.wait_for_match("presence", timeout=10, eventName="left", uuid="mute")
        assert left["channel"] == "plain"
        assert 1.5 < time.monotonic() - started < 6  # interval + timeout = 2 s, then closed
        with pytest.raises(websockets.ConnectionClosed):
            while True:  # what it was sent before the cut (pings, acks), then the close
                await asyncio.wait_for(silent.recv(), 5)
        await asyncio.sleep(6 - (time.monotonic() - started))  # three times interval + timeout
        assert idle.sio.connected
        ack = await idle.call("publish", {"channel": "plain", "message": "still here"})
        assert ack["delivered"]
        assert (await idle.wait_for("message"))[0]["message"] == "still here"
        await idle.disconnect()
    finally:
        server.stop()

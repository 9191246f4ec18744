"""Real Node clients against a real Echo: unchanged ``ekko-realtime-client@2.3.2`` apps and
plain ``socket.io-client`` users.

The clients are the scripts in tests/node (see runner.mjs there): each run gets its steps as
JSON, prints what its clients received as JSON lines and exits on its own. Every wait in a
script has a timeout, so a missing delivery fails the run (exit status 2) rather than hanging.

Ekko's publish and subscribe have no acks, so where a test needs "the server has handled
that subscribe" before going on, it waits for something the server sends because of it: a
presence event (``withPresence: true``) or the client's own message coming back.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from echo.core.auth import issue_token
from tests.conftest import EchoProcess, require_node_clients

pytestmark = pytest.mark.node
WIRE_TESTS = True  # every test here runs on both transports (conftest.py)

NODE_DIR = Path(__file__).resolve().parent / "node"
EKKO = "ekko-client.mjs"
RAW = "socketio-client.mjs"
RUN_TIMEOUT = 15  # seconds per script run; the scripts' own deadline is shorter


@pytest.fixture(scope="module", autouse=True)
def node_clients() -> None:
    require_node_clients()


def uid(prefix: str) -> str:
    """A name of its own per test, so nothing left over from another test can match."""
    return f"{prefix}-{secrets.token_hex(3)}"


@dataclass
class NodeRun:
    lines: list[dict[str, Any]]

    def events(self, client: str, event: str) -> list[Any]:
        return [
            line["data"]
            for line in self.lines
            if line["type"] == "event" and line["client"] == client and line["event"] == event
        ]

    def messages(self, client: str, channel: str | None = None) -> list[Any]:
        return [m for m in self.events(client, "message") if channel in (None, m["channel"])]

    def ack(self, label: str) -> Any:
        [data] = [line["data"] for line in self.lines if line["type"] == "ack"
                  and line["label"] == label]
        return data

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["type"] == kind]

    @property
    def console(self) -> list[str]:
        return [line["text"] for line in self.of_type("console")]


def run_node(server: EchoProcess, script: str, steps: list[dict[str, Any]],
             *, wait_ms: int = 3000) -> NodeRun:
    params = {"url": server.url, "deadlineMs": 10_000, "waitMs": wait_ms, "steps": steps}
    try:
        done = subprocess.run(
            ["node", script, json.dumps(params)], cwd=NODE_DIR, capture_output=True,
            text=True, timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{script} did not exit within {RUN_TIMEOUT}s; stdout so far:\n{exc.stdout}")
    if done.returncode != 0:
        pytest.fail(
            f"{script} exited with {done.returncode}\n"
            f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n"
            f"--- server log (tail)\n{server.log()[-3000:]}"
        )
    try:
        lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    except json.JSONDecodeError:
        pytest.fail(f"{script} printed something that is not a JSON line:\n{done.stdout}")
    assert server.alive(), server.log()
    return NodeRun(lines)


def connect(client: str, app: str, jwt: str, uuid: str | None = None,
            **extra: Any) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "connect", "client": client, "app": app, "jwt": jwt, **extra}
    if uuid is not None:
        step["uuid"] = uuid
    return step


def wait(client: str, event: str, match: Any = None, count: int = 1) -> dict[str, Any]:
    step: dict[str, Any] = {"op": "wait", "client": client, "event": event, "count": count}
    if match is not None:
        step["match"] = match
    return step


def ekko(op: str, client: str, **params: Any) -> dict[str, Any]:
    """An Ekko method call: subscribe / unsubscribe / publish with these params."""
    return {"op": op, "client": client, "params": params}


def emit(client: str, event: str, data: Any, label: str | None = None) -> dict[str, Any]:
    """A socket.io-client emit; with a label it waits for the ack and prints it."""
    step: dict[str, Any] = {"op": "emit", "client": client, "event": event, "data": data}
    if label is not None:
        step.update(ack=True, label=label)
    return step


# -- ekko-realtime-client@2.3.2, unchanged ---------------------------------------------------


def test_ekko_client_publishes_and_receives_the_transformed_message(
    echo_server: EchoProcess,
) -> None:
    alice = uid("alice")
    result = run_node(echo_server, EKKO, [
        connect("alice", "chat-demo", echo_server.token("chat-demo"), alice),
        ekko("subscribe", "alice", channels=["angry"]),
        ekko("publish", "alice", channel="angry", message={"text": "hello"}),
        wait("alice", "message", {"channel": "angry", "uuid": alice}),
    ])
    [delivered] = result.messages("alice")
    assert delivered["channel"] == "angry"
    assert delivered["message"] == {"text": "HELLO!!!"}
    assert delivered["uuid"] == alice
    assert isinstance(delivered["id"], str) and delivered["id"]
    assert isinstance(delivered["seq"], int) and isinstance(delivered["ts"], int)
    assert "connected" in result.console  # Ekko's own console.log on connect
    assert result.of_type("connect")[0]["transport"] == "websocket"  # Ekko's only transport
    assert result.events("alice", "error") == []


def test_two_ekko_clients_see_each_others_transformed_messages(echo_server: EchoProcess) -> None:
    alice, bob = uid("alice"), uid("bob")
    angry = {"channels": ["angry"], "withPresence": True}
    result = run_node(echo_server, EKKO, [
        connect("alice", "chat-demo", echo_server.token("chat-demo"), alice),
        connect("bob", "chat-demo", echo_server.token("chat-demo"), bob),
        ekko("subscribe", "alice", **angry),
        wait("alice", "presence", {"eventName": "joined", "channel": "angry", "uuid": alice}),
        ekko("subscribe", "bob", **angry),
        # alice seeing bob join means the server has put bob on the channel
        wait("alice", "presence", {"eventName": "joined", "channel": "angry", "uuid": bob}),
        ekko("publish", "alice", channel="angry", message={"text": "hi bob"}),
        ekko("publish", "bob", channel="angry", message={"text": "hi alice", "mood": "ok"}),
        wait("alice", "message", {"channel": "angry"}, count=2),
        wait("bob", "message", {"channel": "angry"}, count=2),
    ])
    expected = {
        (alice, json.dumps({"text": "HI BOB!!!"})),
        (bob, json.dumps({"text": "HI ALICE!!!", "mood": "ok"}, sort_keys=True)),
    }
    for client in ("alice", "bob"):
        got = {(m["uuid"], json.dumps(m["message"], sort_keys=True))
               for m in result.messages(client, "angry")}
        assert got == expected, client


def test_ekko_client_on_a_chain_gets_every_function_applied_in_order(
    echo_server: EchoProcess,
) -> None:
    carol = uid("carol")
    result = run_node(echo_server, EKKO, [
        connect("carol", "chat-demo", echo_server.token("chat-demo"), carol),
        ekko("subscribe", "carol", channels=["emoji"]),
        ekko("publish", "carol", channel="emoji", message={"text": "hello"}),
        wait("carol", "message", {"channel": "emoji"}),
    ])
    [delivered] = result.messages("carol", "emoji")
    # demo-angry, then demo-emojify
    assert delivered["message"] == {"text": "\N{ANGRY FACE} HELLO!!! \N{ANGRY FACE}"}
    assert delivered["uuid"] == carol


def test_ekko_client_never_receives_a_filtered_message(echo_server: EchoProcess) -> None:
    result = run_node(echo_server, EKKO, [
        connect("dave", "test-app", echo_server.token("test-app"), uid("dave")),
        ekko("subscribe", "dave", channels=["filtered"]),
        ekko("publish", "dave", channel="filtered", message="calm before"),
        ekko("publish", "dave", channel="filtered", message="STOP SHOUTING"),
        ekko("publish", "dave", channel="filtered", message="calm words"),
        wait("dave", "message", {"channel": "filtered", "message": "calm words"}),
    ])
    delivered = result.messages("dave", "filtered")
    assert [m["message"] for m in delivered] == ["calm before", "calm words"]
    # a channel delivers in publish order: the shouting got its seq and was dropped
    assert delivered[1]["seq"] == delivered[0]["seq"] + 2
    assert result.events("dave", "error") == []


def test_ekko_unsubscribe_stops_delivery(echo_server: EchoProcess) -> None:
    news, other = uid("news"), uid("other")
    listener, publisher = uid("listener"), uid("publisher")
    token = echo_server.token("test-app")
    result = run_node(echo_server, EKKO, [
        connect("listener", "test-app", token, listener),
        connect("publisher", "test-app", token, publisher),
        ekko("subscribe", "publisher", channels=[news], withPresence=True),
        wait("publisher", "presence", {"eventName": "joined", "uuid": publisher}),
        ekko("subscribe", "listener", channels=[news, other], withPresence=True),
        wait("publisher", "presence", {"eventName": "joined", "uuid": listener}),
        ekko("publish", "publisher", channel=news, message="before"),
        wait("listener", "message", {"channel": news, "message": "before"}),
        ekko("unsubscribe", "listener", channels=[news]),
        wait("publisher", "presence", {"eventName": "left", "uuid": listener}),
        ekko("publish", "publisher", channel=news, message="after"),
        wait("publisher", "message", {"channel": news, "message": "after"}),
        # the server emitted "after" before this one; the listener gets messages in order
        ekko("publish", "publisher", channel=other, message="still subscribed here"),
        wait("listener", "message", {"channel": other}),
    ])
    assert [m["message"] for m in result.messages("listener", news)] == ["before"]
    assert [m["message"] for m in result.messages("listener", other)] == [
        "still subscribed here"]


def test_ekko_presence_announces_only_with_presence_subscribers(echo_server: EchoProcess) -> None:
    """As Ekko's server did: a socket that subscribes without ``withPresence`` is neither
    told of others nor announced to them; events carry Ekko's ``presenceChannel``; admins
    get ``joined``/``left`` statuses."""
    lobby, watcher, visitor, lurker = uid("lobby"), uid("watcher"), uid("visitor"), uid("lurker")
    ops = uid("ops")
    token = echo_server.token("test-app")
    result = run_node(echo_server, EKKO, [
        connect("ops", "test-app", echo_server.token("test-app", admin=True), ops),
        connect("watcher", "test-app", token, watcher),
        ekko("subscribe", "watcher", channels=[lobby], withPresence=True),
        wait("watcher", "presence", {"uuid": watcher}),
        connect("lurker", "test-app", token, lurker),
        ekko("subscribe", "lurker", channels=[lobby]),
        connect("visitor", "test-app", token, visitor),
        ekko("subscribe", "visitor", channels=[lobby], withPresence=True),
        wait("watcher", "presence", {"eventName": "joined", "uuid": visitor}),
        {"op": "stop", "client": "lurker"},
        {"op": "stop", "client": "visitor"},
        wait("watcher", "presence", {"eventName": "left", "uuid": visitor}),
        wait("ops", "status", {"event": "left", "uuid": visitor}),
    ])
    room = {"channel": lobby, "presenceChannel": f"{lobby}_presence"}
    assert result.events("watcher", "presence") == [
        {"eventName": "joined", **room, "uuid": watcher},
        {"eventName": "joined", **room, "uuid": visitor},
        {"eventName": "left", **room, "uuid": visitor},
    ]
    assert result.events("lurker", "presence") == []  # it did not ask for presence
    seen = [(s["event"], s["uuid"]) for s in result.events("ops", "status")
            if s["event"] in ("joined", "left")]
    assert seen == [("joined", watcher), ("joined", visitor), ("left", visitor)]


def test_ekko_admin_client_receives_status_of_other_connections(
    echo_server: EchoProcess,
) -> None:
    ops, user = uid("ops"), uid("user")
    result = run_node(echo_server, EKKO, [
        connect("ops", "test-app", echo_server.token("test-app", admin=True), ops),
        connect("user", "test-app", echo_server.token("test-app"), user),
        ekko("subscribe", "user", channels=["plain"]),
        {"op": "stop", "client": "user"},
        wait("ops", "status", {"event": "disconnection", "uuid": user}),
    ])
    statuses = [s for s in result.events("ops", "status") if s["uuid"] == user]
    assert [s["event"] for s in statuses] == ["connection", "subscribe", "disconnection"]
    connection = statuses[0]
    # Ekko's shape, {message: {event, app, uuid, admin}}, and the flat fields
    assert connection["message"] == {
        "event": "connection", "app": "test-app", "uuid": user, "admin": False}
    assert connection["app"] == "test-app" and connection["admin"] is False
    assert isinstance(connection["ts"], int)
    assert statuses[1]["channels"] == ["plain"]
    assert result.events("user", "status") == []


def test_ekko_edges_an_admin_sees_itself_right_and_a_refused_channel_spares_the_rest(
        echo_server: EchoProcess) -> None:
    """An admin's own subscribe says ``admin: true``; it gets no event before its CONNECT
    reply (its own ``connection`` status, as in Ekko, is not sent to it); a user's subscribe
    naming ``admin`` among other channels joins the others, as Ekko did."""
    ops, user, news = uid("ops"), uid("user"), uid("news")
    result = run_node(echo_server, EKKO, [
        connect("ops", "test-app", echo_server.token("test-app", admin=True), ops),
        ekko("subscribe", "ops", channels=["plain"]),
        wait("ops", "status", {"event": "subscribe", "uuid": ops}),
        connect("user", "test-app", echo_server.token("test-app"), user),
        ekko("subscribe", "user", channels=["admin", news]),
        wait("ops", "status", {"event": "subscribe", "uuid": user}),
        ekko("publish", "ops", channel=news, message="past the refusal"),
        wait("user", "message", {"channel": news, "message": "past the refusal"}),
    ])
    own = [s for s in result.events("ops", "status") if s["uuid"] == ops]
    assert [(s["event"], s["admin"]) for s in own] == [("subscribe", True)]
    first = next(e for e in result.lines
                 if e.get("client") == "ops" and e["type"] in ("event", "connect"))
    assert first["type"] == "connect"  # nothing before the CONNECT reply
    joined = next(s for s in result.events("ops", "status")
                  if s["event"] == "subscribe" and s["uuid"] == user)
    assert joined["channels"] == [news] and result.events("user", "status") == []


@pytest.mark.parametrize(
    ("token_for", "expected"),
    [
        ("garbage", "Authorization error: invalid token"),
        ("chat-demo", "Authorization error: token is for app 'chat-demo', not 'test-app'"),
        ("wrong-secret", "Authorization error: bad token signature"),
        ("expired", "Authorization error: token expired"),
    ],
)
def test_ekko_client_with_a_bad_token_gets_a_clear_connect_error(
    echo_server: EchoProcess, token_for: str, expected: str
) -> None:
    token = {
        "garbage": "not-a-jwt",
        "chat-demo": echo_server.token("chat-demo"),
        "wrong-secret": issue_token("another-secret-0123456789abcdef-0123", "test-app"),
        "expired": echo_server.token("test-app", ttl=-3600),
    }[token_for]
    result = run_node(echo_server, EKKO, [
        connect("eve", "test-app", token, uid("eve"), expect="connect_error"),
        {"op": "sleep", "ms": 200},  # no reconnect loop, no late "connected"
    ])
    [error] = result.of_type("connect_error")
    assert error["message"].startswith(expected), error
    # Ekko prints err.message with console.log: what the app developer sees
    assert result.console == [error["message"]]
    assert result.of_type("connect") == []


# -- plain socket.io-client ------------------------------------------------------------------


def test_socketio_client_gets_acks_for_subscribe_and_publish(echo_server: EchoProcess) -> None:
    frank = uid("frank")
    result = run_node(echo_server, RAW, [
        # default transports: long-polling first, then the upgrade to WebSocket
        connect("frank", "chat-demo", echo_server.token("chat-demo"), frank),
        emit("frank", "subscribe", {"channels": ["backwards"]}, label="subscribe"),
        emit("frank", "publish", {"channel": "backwards", "message": {"text": "hello"}},
             label="publish"),
        wait("frank", "message", {"channel": "backwards"}),
        wait("frank", "transport_upgrade"),
        emit("frank", "unsubscribe", {"channels": ["backwards"]}, label="unsubscribe"),
    ])
    # it really started on long-polling and was upgraded
    [connected] = result.of_type("connect")
    assert connected["firstTransport"] == "polling"
    assert result.events("frank", "transport_upgrade") == ["websocket"]
    assert result.ack("subscribe") == {"ok": True, "channels": ["backwards"]}
    ack = result.ack("publish")
    assert ack["ok"] is True and ack["delivered"] is True
    assert isinstance(ack["id"], str) and isinstance(ack["seq"], int)
    assert isinstance(ack["ts"], int)
    [delivered] = result.messages("frank")
    assert delivered == {"channel": "backwards", "message": {"text": "olleh"}, "uuid": frank,
                         "id": ack["id"], "seq": ack["seq"], "ts": ack["ts"]}
    assert result.ack("unsubscribe") == {"ok": True, "channels": ["backwards"]}


def test_socketio_client_malformed_publishes_get_error_acks_and_the_socket_keeps_working(
    echo_server: EchoProcess,
) -> None:
    channel = uid("plain")
    bad = {
        "no-message": ("publish", {"channel": channel}, "bad_request"),
        "bad-channel": ("publish", {"channel": "no spaces", "message": 1}, "bad_channel"),
        "number-channel": ("publish", {"channel": 42, "message": 1}, "bad_request"),
        "not-an-object": ("publish", "hello", "bad_request"),
        "admin-channel": ("publish", {"channel": "admin", "message": 1}, "forbidden"),
        "too-large": ("publish", {"channel": channel, "message": "x" * (65 * 1024)},
                      "too_large"),
        "unknown-event": ("shout", {"channel": channel, "message": 1}, "unknown_event"),
        "bad-subscribe": ("subscribe", {"channels": []}, "bad_request"),
    }
    steps = [
        connect("gina", "test-app", echo_server.token("test-app"), uid("gina"),
                options={"transports": ["websocket"]}),
        emit("gina", "subscribe", {"channels": [channel]}, label="subscribe"),
    ]
    steps += [emit("gina", event, data, label=label) for label, (event, data, _) in bad.items()]
    steps += [
        emit("gina", "publish", {"channel": channel, "message": "fine"}, label="good"),
        wait("gina", "message", {"channel": channel}),
    ]
    result = run_node(echo_server, RAW, steps)
    for label, (_, _, code) in bad.items():
        ack = result.ack(label)
        assert ack["ok"] is False, (label, ack)
        assert ack["error"]["code"] == code, (label, ack)
        assert isinstance(ack["error"]["message"], str) and ack["error"]["message"], label
    assert result.ack("too-large")["error"]["message"] == (
        f"publish.message is {65 * 1024 + 2} bytes encoded; the limit is {64 * 1024}")
    assert "publish.message is missing" in result.ack("no-message")["error"]["message"]
    # with an ack asked for, refusals come only as the ack, not also as an error event
    assert result.events("gina", "error") == []
    assert result.ack("good")["ok"] is True
    assert [m["message"] for m in result.messages("gina")] == ["fine"]


def test_socketio_client_refusal_without_ack_arrives_as_error_event(
    echo_server: EchoProcess,
) -> None:
    result = run_node(echo_server, RAW, [
        connect("hal", "test-app", echo_server.token("test-app"), uid("hal")),
        emit("hal", "publish", {"channel": "plain"}),
        wait("hal", "error"),
    ])
    [error] = result.events("hal", "error")
    assert error["code"] == "bad_request" and error["event"] == "publish"
    assert error["message"] == "publish.message is missing"


def test_socketio_client_function_that_raises_gets_function_error_ack(
    echo_server: EchoProcess,
) -> None:
    ivy = uid("ivy")
    result = run_node(echo_server, RAW, [
        connect("admin", "test-app", echo_server.token("test-app", admin=True), uid("ops")),
        connect("ivy", "test-app", echo_server.token("test-app"), ivy),
        emit("ivy", "subscribe", {"channels": ["raise", "plain"]}, label="subscribe"),
        emit("ivy", "publish", {"channel": "raise", "message": {"text": "x"}}, label="raise"),
        emit("ivy", "publish", {"channel": "plain", "message": "after"}, label="after"),
        wait("ivy", "message", {"channel": "plain", "message": "after"}),
        wait("admin", "status", {"event": "function_error", "uuid": ivy}),
    ])
    ack = result.ack("raise")
    assert ack["ok"] is False
    error = ack["error"]
    assert error["code"] == "function_error"
    assert error["function"] == "fail-raise"
    assert error["message"].startswith("not delivered:")
    assert isinstance(error["id"], str) and isinstance(error["kind"], str)
    # nothing from the failed chain was delivered; the socket still works
    assert result.messages("ivy", "raise") == []
    assert result.ack("after")["ok"] is True
    # and the app's admins are told
    [status] = [s for s in result.events("admin", "status") if s["event"] == "function_error"]
    assert status["channel"] == "raise" and status["function"] == "fail-raise"
    assert status["messageId"] == error["id"] and status["kind"] == error["kind"]
    assert "boom from fail-raise" in json.dumps(status["error"])


def test_socketio_client_with_a_token_for_another_app_gets_connect_error(
    echo_server: EchoProcess,
) -> None:
    result = run_node(echo_server, RAW, [
        connect("jo", "test-app", echo_server.token("chat-demo"), expect="connect_error"),
    ])
    [error] = result.of_type("connect_error")
    assert error["message"] == (
        "Authorization error: token is for app 'chat-demo', not 'test-app'")

"""Every bad input gets a clear error, and the server keeps serving everyone else."""

from __future__ import annotations

import asyncio
import time

import pytest
import socketio

from tests.conftest import SECRET, Client, EchoProcess, connect

pytestmark = pytest.mark.anyio
WIRE_TESTS = True  # every test here runs on both transports (conftest.py)


async def assert_still_serving(server: EchoProcess) -> None:
    """A fresh pair of clients can still chat through a function: nothing was stalled."""
    probe = await connect(server, uuid="probe")
    try:
        await probe.call("subscribe", {"channels": ["angry"]})
        ack = await probe.call("publish", {"channel": "angry", "message": "still here"})
        assert ack["ok"], ack
        [message] = await probe.wait_for("message")
        assert message["message"] == "STILL HERE!!!"
    finally:
        await probe.disconnect()
    assert server.alive()


async def refused(server: EchoProcess, app: str, auth: object) -> str:
    """Connect, expect refusal, return the reason the server gave in connect_error."""
    client = socketio.AsyncClient(reconnection=False)
    reasons: list[object] = []
    client.on("connect_error", reasons.append, namespace="/" + app)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect(server.url, namespaces=["/" + app], auth=auth,
                             transports=["websocket"], wait_timeout=5)
    await client.disconnect()
    assert len(reasons) == 1, reasons
    reason = reasons[0]
    return reason["message"] if isinstance(reason, dict) else str(reason)


@pytest.mark.parametrize(
    ("auth_for", "reason"),
    [
        (lambda s: {"jwt": "not-a-jwt"}, "invalid token"),
        (lambda s: {"jwt": s.token("other-app")}, "token is for app 'other-app', not 'test-app'"),
        (lambda s: {"jwt": s.token(ttl=-60)}, "token expired"),
        (lambda s: {}, "missing token"),
        (lambda s: None, "missing token"),
        (lambda s: {"jwt": __import__("jwt").encode({"appName": "test-app"}, "x" * 32,
                                                   algorithm="HS256")}, "bad token signature"),
        (lambda s: {"jwt": __import__("jwt").encode({"appName": "test-app"}, None,
                                                   algorithm="none")}, "not allowed"),
    ],
    ids=["garbage", "other-app", "expired", "no-jwt", "no-auth", "wrong-secret", "alg-none"],
)
async def test_bad_tokens_are_refused_with_a_reason(
    echo_server: EchoProcess, auth_for: object, reason: str
) -> None:
    message = await refused(echo_server, "test-app", auth_for(echo_server))  # type: ignore[operator]
    assert "Authorization error" in message and reason in message


async def test_token_without_app_claim_is_refused(echo_server: EchoProcess) -> None:
    import jwt

    token = jwt.encode({"admin": True}, SECRET, algorithm="HS256")
    assert "no appName claim" in await refused(echo_server, "test-app", {"jwt": token})


MALFORMED = [
    ("subscribe", None, "bad_request"),
    ("subscribe", "angry", "bad_request"),
    ("subscribe", {"channels": "angry"}, "bad_request"),
    ("subscribe", {"channels": []}, "bad_request"),
    ("subscribe", {"channels": [42]}, "bad_request"),
    ("subscribe", {"channels": ["has space"]}, "bad_channel"),
    ("subscribe", {"channels": ["x" * 201]}, "bad_channel"),
    ("subscribe", {"channels": ["ok"], "withPresence": "yes"}, "bad_request"),
    ("subscribe", {"channels": ["c"] * 101}, "bad_request"),
    ("unsubscribe", {}, "bad_request"),
    ("publish", [], "bad_request"),
    ("publish", {"message": "no channel"}, "bad_request"),
    ("publish", {"channel": "plain"}, "bad_request"),
    ("publish", {"channel": "admin", "message": "x"}, "forbidden"),
    ("publish", {"channel": "a#presence", "message": "x"}, "bad_channel"),
    ("publish", {"channel": "plain", "message": "x" * (64 * 1024 + 1)}, "too_large"),
    ("shout", {"channel": "plain"}, "unknown_event"),
    # found by fuzzing: JSON allows integers that no 64-bit encoder can relay
    ("publish", {"channel": "plain", "message": -(2**63) - 1}, "bad_request"),
]


@pytest.mark.parametrize(("event", "payload", "code"), MALFORMED)
async def test_malformed_events_get_an_error_ack(
    echo_server: EchoProcess, clients: list[Client], event: str, payload: object, code: str
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    reply = await client.call(event, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    assert reply["error"]["message"]
    # the same connection keeps working
    assert (await client.call("subscribe", {"channels": ["plain"]}))["ok"]


async def test_without_ack_errors_arrive_as_error_events(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.emit("publish", {"channel": "plain"})
    await client.emit("subscribe", {"channels": [1]})
    errors = await client.wait_for("error", 2)
    assert [(e["event"], e["code"]) for e in errors] == [
        ("publish", "bad_request"), ("subscribe", "bad_request")]
    assert "publish.message is missing" in errors[0]["message"]


async def test_oversize_message_names_size_and_limit(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    reply = await client.call("publish", {"channel": "plain", "message": "x" * 70000})
    assert reply["error"]["code"] == "too_large"
    assert "70002 bytes" in reply["error"]["message"] and "65536" in reply["error"]["message"]
    await assert_still_serving(echo_server)


@pytest.mark.parametrize(
    ("channel", "kind", "detail"),
    [
        ("raise", "raised", "ValueError: boom from fail-raise"),
        ("hang", "timeout", "no result within 0.5s"),
        ("garbage", "bad_result", "not JSON"),
        ("exit", "crashed", "exited with code 3"),
        ("missing", "not_found", "no folder"),
    ],
)
async def test_failing_function_is_not_delivered_and_reported(
    echo_server: EchoProcess, clients: list[Client], channel: str, kind: str, detail: str
) -> None:
    publisher = await connect(echo_server, uuid="pub")
    subscriber = await connect(echo_server, uuid="sub")
    admin = await connect(echo_server, admin=True, uuid="ops")
    clients += [publisher, subscriber, admin]
    await subscriber.call("subscribe", {"channels": [channel]})
    reply = await publisher.call("publish", {"channel": channel, "message": {"text": "hi"}})
    assert reply["ok"] is False
    error = reply["error"]
    assert error["code"] == "function_error" and error["kind"] == kind
    assert detail in error["message"]
    report = await admin.wait_for_match("status", event="function_error")
    assert report["channel"] == channel and report["kind"] == kind and report["uuid"] == "pub"
    # the channel is not stalled: the next message is handled (and fails the same way)
    again = await publisher.call("publish", {"channel": channel, "message": {"text": "again"}})
    assert again["error"]["kind"] == kind
    assert subscriber.messages == []
    await assert_still_serving(echo_server)


async def test_hanging_function_does_not_stall_other_channels(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    publisher = await connect(echo_server)
    clients.append(publisher)
    await publisher.call("subscribe", {"channels": ["plain", "angry"]})
    hang = asyncio.create_task(publisher.call("publish", {"channel": "hang", "message": 1}))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    plain = await publisher.call("publish", {"channel": "plain", "message": "fast"})
    angry = await publisher.call("publish", {"channel": "angry", "message": "fast"})
    elapsed = time.monotonic() - started
    assert plain["ok"] and angry["ok"]
    assert not hang.done(), f"other channels waited for the hanging function ({elapsed:.2f}s)"
    assert (await hang)["error"]["kind"] == "timeout"


async def test_messages_on_one_channel_arrive_in_publish_order(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": ["slow"]})
    delays = [0.2, 0.0, 0.1, 0.0, 0.05]
    acks = await asyncio.gather(*(
        client.call("publish", {"channel": "slow", "message": {"n": n, "delay": d}})
        for n, d in enumerate(delays)
    ))
    assert all(a["ok"] for a in acks)
    received = await client.wait_for("message", len(delays))
    assert [m["message"]["n"] for m in received] == sorted(m["message"]["n"] for m in received)
    assert [m["seq"] for m in received] == sorted(a["seq"] for a in acks)

"""Who may do what: rotation, per-app secrets, capabilities, CORS, limits, slow consumers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets

from echo.core.auth import issue_token
from tests.conftest import SECRET, Client, EchoProcess, connect, make_project

pytestmark = pytest.mark.anyio

OLD_SECRET = "old-secret-0123456789abcdef-0123456789"
APP_SECRET = "chat-demo-only-secret-0123456789abcdef"
ORIGIN = "http://good.example"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    project = make_project(tmp_path_factory.mktemp("guarded"))
    server = EchoProcess(project, env={
        "ECHO_PREVIOUS_SECRET": OLD_SECRET,
        "ECHO_APP_SECRETS": json.dumps({"chat-demo": [APP_SECRET]}),
        "ECHO_CORS_ORIGINS": ORIGIN,
        "ECHO_MAX_CHANNELS_PER_CONNECTION": "5",
        "ECHO_MAX_CONNECTIONS_PER_APP": "4",
        "ECHO_PUBLISH_RATE": "5",
        "ECHO_PUBLISH_BURST": "5",
    }).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def small_queues(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    project = make_project(tmp_path_factory.mktemp("small-queues"))
    server = EchoProcess(project, env={"ECHO_MAX_QUEUED_PACKETS": "50",
                                       "ECHO_PUBLISH_RATE": "0"}).start()
    yield server
    server.stop()


async def test_rotation_accepts_the_previous_secret_until_it_is_removed(
    guarded: EchoProcess, clients: list[Client]
) -> None:
    for secret in (SECRET, OLD_SECRET):
        client = await connect(guarded, token=issue_token(secret, "test-app"))
        clients.append(client)
        assert (await client.call("subscribe", {"channels": ["plain"]}))["ok"]
        await client.disconnect()


async def test_per_app_secret_replaces_the_shared_one_for_that_app(
    guarded: EchoProcess, clients: list[Client]
) -> None:
    from tests.test_bad_input import refused

    client = await connect(guarded, "chat-demo", token=issue_token(APP_SECRET, "chat-demo"))
    clients.append(client)
    await client.disconnect()
    reason = await refused(guarded, "chat-demo", {"jwt": issue_token(SECRET, "chat-demo")})
    assert "bad token signature" in reason
    # and the app secret opens no other app
    reason = await refused(guarded, "test-app", {"jwt": issue_token(APP_SECRET, "test-app")})
    assert "bad token signature" in reason


async def test_capabilities_limit_a_token_to_its_channels_and_operations(
    guarded: EchoProcess, clients: list[Client]
) -> None:
    token = issue_token(SECRET, "test-app", capabilities={"room:*": ["subscribe"],
                                                          "plain": ["subscribe", "publish"]})
    client = await connect(guarded, token=token)
    clients.append(client)
    assert (await client.call("subscribe", {"channels": ["room:1", "plain"]}))["ok"]
    cases = [
        ("publish", {"channel": "room:1", "message": "x"}, "may not publish to 'room:1'"),
        ("subscribe", {"channels": ["angry"]}, "may not subscribe to 'angry'"),
        ("subscribe", {"channels": ["room:2"], "withPresence": True},
         "may not see presence on 'room:2'"),
    ]
    for event, payload, message in cases:
        reply = await client.call(event, payload)
        assert reply["error"]["code"] == "forbidden" and message in reply["error"]["message"]
    assert (await client.call("publish", {"channel": "plain", "message": "allowed"}))["delivered"]

    from tests.test_bad_input import refused

    bad = issue_token(SECRET, "test-app", capabilities={"x": ["delete"]})
    assert "unknown operation 'delete'" in await refused(guarded, "test-app", {"jwt": bad})


async def test_cors_allows_only_listed_origins(guarded: EchoProcess) -> None:
    url = guarded.url + "/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient() as http:
        good = await http.get(url, headers={"origin": ORIGIN})
        evil = await http.get(url, headers={"origin": "http://evil.example"})
        api = await http.options(guarded.url + "/associations", headers={
            "origin": "http://evil.example", "access-control-request-method": "PUT"})
    assert good.status_code == 200
    assert good.headers["access-control-allow-origin"] == ORIGIN
    assert evil.status_code == 403  # the native transport refuses a foreign Origin
    assert "access-control-allow-origin" not in api.headers


async def test_channel_and_connection_limits(guarded: EchoProcess, clients: list[Client]) -> None:
    client = await connect(guarded)
    clients.append(client)
    assert (await client.call("subscribe", {"channels": ["a", "b", "c"]}))["ok"]
    reply = await client.call("subscribe", {"channels": ["d", "e", "f"]})
    assert reply["error"]["code"] == "limit"
    assert "6 channels on one connection; the limit is 5" in reply["error"]["message"]

    from tests.test_bad_input import refused

    others = [await connect(guarded) for _ in range(3)]  # 4 in all: the limit
    clients.extend(others)
    reason = await refused(guarded, "test-app", {"jwt": guarded.token()})
    assert "has 4 connections on this node, the limit is 4" in reason
    await others[0].disconnect()
    clients.append(await connect(guarded))  # room again once one left


async def test_publish_rate_limit_says_when_to_retry(
    guarded: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(guarded)
    clients.append(client)
    replies = [await client.call("publish", {"channel": "plain", "message": n}) for n in range(8)]
    limited = [r for r in replies if not r["ok"]]
    assert len([r for r in replies if r["ok"]]) >= 5 and limited
    error = limited[0]["error"]
    assert error["code"] == "rate_limited" and 0 < error["retryAfterMs"] <= 200
    assert "over 5 publishes/s" in error["message"]
    await asyncio.sleep(error["retryAfterMs"] / 1000 + 0.05)
    assert (await client.call("publish", {"channel": "plain", "message": "later"}))["ok"]


async def test_a_client_that_stops_reading_is_disconnected_and_others_are_served(
    small_queues: EchoProcess, clients: list[Client]
) -> None:
    guarded = small_queues
    # a raw Socket.IO client over a socket with a tiny receive buffer, that never reads
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", guarded.port))
    ws = await websockets.connect(
        f"ws://127.0.0.1:{guarded.port}/socket.io/?EIO=4&transport=websocket", sock=sock,
        max_queue=1, max_size=None)
    await ws.recv()  # engine.io open
    await ws.send('40/test-app,' + json.dumps({"jwt": guarded.token(), "uuid": "sloth"}))
    await ws.recv()  # socket.io connect
    await ws.send('42/test-app,["subscribe",{"channels":["slowpoke"]}]')

    reader = await connect(guarded)
    publisher = await connect(guarded, token=issue_token(SECRET, "test-app"))
    clients += [reader, publisher]
    await reader.call("subscribe", {"channels": ["slowpoke"]})
    big = "x" * 60_000
    sent = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        replies = await asyncio.gather(*(
            publisher.call("publish", {"channel": "slowpoke", "message": big}) for _ in range(20)))
        sent += sum(1 for r in replies if r["ok"])
        async with httpx.AsyncClient() as http:
            text = (await http.get(guarded.url + "/metrics", headers=guarded.operator())).text
        if "echo_slow_consumers_disconnected_total 1.0" in text:
            break
    else:
        raise AssertionError(f"the non-reading client was never disconnected ({sent} sent)")
    await reader.wait_for("message", sent, timeout=10)
    assert "slow consumer" in guarded.log()
    await ws.close()
    sock.close()


async def test_no_secret_ever_reaches_the_log(guarded: EchoProcess) -> None:
    log = guarded.log()
    assert log  # the server did log things during this module
    for secret in (SECRET, OLD_SECRET, APP_SECRET):
        assert secret not in log

"""The Python SDK (echo.sdk) against a real ``echoctl dev``: the HTTP server API clients, the
token helpers, and the socket client, whose connection is cut by a real TCP proxy in the
middle (its sockets closed, new ones refused) while messages are published: it reconnects,
asks for a fresh token, re-subscribes and recovers every missed message, once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid as uuids
from collections.abc import AsyncIterator
from typing import Any

import pytest
import socketio

from echo.core.auth import verify_token
from echo.sdk import AsyncServerApi, EchoError, RealtimeClient, ServerApi, admin_token, user_token
from tests.conftest import SECRET, TEST_APP, EchoProcess

pytestmark = pytest.mark.anyio


class Proxy:
    """A TCP proxy on loopback that can cut every connection and refuse new ones."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.open = True
        self.pipes: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.pipes.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.open = False
        for writer in list(self.pipes):
            writer.transport.abort()  # a dropped TCP connection, not a goodbye
        self.pipes.clear()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxy(echo_server: EchoProcess) -> AsyncIterator[Proxy]:
    started = await Proxy(echo_server.port).start()
    yield started
    await started.stop()


def test_tokens_name_the_user_and_expire() -> None:
    claims = verify_token(SECRET, user_token(SECRET, TEST_APP, "ada", ttl=60,
                                             capabilities={"chat:*": ["subscribe"]}), app=TEST_APP)
    assert claims.user == "ada" and not claims.admin and claims.capabilities is not None
    assert verify_token(SECRET, admin_token(SECRET, TEST_APP), app=TEST_APP).admin


def test_the_sync_server_api_client(echo_server: EchoProcess) -> None:
    channel = "hist:" + uuids.uuid4().hex[:8]
    with ServerApi(echo_server.url, TEST_APP, admin_token(SECRET, TEST_APP)) as api:
        ack = api.publish(channel, {"n": 1}, uuid="billing", idempotency_key="k1")
        again = api.publish(channel, {"n": 1}, idempotency_key="k1")
        assert ack["offset"] == 1 and again["duplicate"] is True
        assert api.broadcast(["plain", "room:x"], "hi")["results"]["room:x"]["ok"]
        assert api.presence("nobody-here")["count"] == 0
        read = api.history(channel, since=0, epoch=ack["epoch"])
        assert read["recovered"] is True and [p["message"] for p in read["publications"]] == [{"n": 1}]
        with pytest.raises(EchoError) as refused:
            api.publish("bad name", 1)
        assert refused.value.code == "bad_channel"
    with ServerApi(echo_server.url, TEST_APP, echo_server.token()) as user:
        with pytest.raises(EchoError) as forbidden:
            user.publish("plain", 1)
        assert forbidden.value.code == "forbidden"


async def test_an_expired_sdk_token_is_refused_with_the_documented_error(
        echo_server: EchoProcess) -> None:
    client = RealtimeClient(echo_server.url, TEST_APP,
                            token=user_token(SECRET, TEST_APP, "late", ttl=-60))
    reasons: list[Any] = []
    client.sio.on("connect_error", reasons.append, namespace="/" + TEST_APP)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect()
    await client.close()
    assert "Authorization error: token expired" in str(reasons[0])


async def test_the_async_server_api_client(echo_server: EchoProcess) -> None:
    async with AsyncServerApi(echo_server.url, TEST_APP, admin_token(SECRET, TEST_APP)) as api:
        ack = await api.publish("angry", {"text": "hey"})
        assert ack["delivered"] is True
        with pytest.raises(EchoError) as refused:
            await api.history("plain")
        assert refused.value.code == "bad_request"


async def test_the_socket_client_recovers_what_it_missed_while_cut_off(
        echo_server: EchoProcess, proxy: Proxy) -> None:
    channel = "hist:" + uuids.uuid4().hex[:8]
    tokens: list[str] = []

    def fresh_token() -> str:
        tokens.append(user_token(SECRET, TEST_APP, "sdk-user", ttl=60))
        return tokens[-1]

    client = RealtimeClient(f"http://127.0.0.1:{proxy.port}", TEST_APP, get_token=fresh_token)
    got: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []
    client.on("message", got.append)
    client.on("state", states.append)
    await client.connect()
    try:
        await client.subscribe([channel])
        for n in range(5):
            await client.publish(channel, n)
        await wait_until(lambda: len(got) == 5)
        proxy.cut()
        await wait_until(lambda: client.state == "disconnected")
        async with AsyncServerApi(echo_server.url, TEST_APP, admin_token(SECRET, TEST_APP)) as api:
            for n in range(5, 55):
                await api.publish(channel, n)
        proxy.open = True
        await wait_until(lambda: any(s.get("recovered") for s in states), timeout=20)
        await wait_until(lambda: len(got) >= 55)
        await client.publish(channel, 55)
        await wait_until(lambda: len(got) >= 56)
        assert [m["message"] for m in got] == list(range(56))
        assert [m["offset"] for m in got] == list(range(1, 57))
        assert [s["recovered"] for s in states if "recovered" in s] == [{channel: True}]
        assert len(tokens) >= 2 and all(m["uuid"] in ("sdk-user", "server") for m in got)
        with pytest.raises(EchoError) as refused:
            await client.subscribe(["user:someone-else"])
        assert refused.value.code == "forbidden"
    finally:
        await client.close()


async def wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.02)

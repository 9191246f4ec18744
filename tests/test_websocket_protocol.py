"""Echo's WebSocket protocol for uvicorn, as an ASGI WebSocket server (RFC 6455 + ASGI spec).

Real uvicorn on a free loopback port with ``ws=EchoWebSocketProtocol``; small ASGI apps;
clients are the websockets library and raw sockets (for what a polite client never sends).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from echo.transport.http_guard import Guard, guarded_protocol
from echo.transport.websocket_protocol import EXTENSION, FRAME, EchoWebSocketProtocol, encode_frame
from tests.conftest import free_port

pytestmark = [pytest.mark.anyio, pytest.mark.unit]

App = Callable[[Any, Any, Any], Awaitable[None]]


@contextlib.asynccontextmanager
async def running(app: App, **config: Any) -> AsyncIterator[tuple[str, uvicorn.Server]]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=port, ws=EchoWebSocketProtocol, lifespan="off",
        log_level="warning", timeout_graceful_shutdown=2, **config))
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await asyncio.sleep(0.005)
    try:
        yield f"ws://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        await task


def connect(url: str, **kwargs: Any) -> Any:
    return websockets.connect(url, proxy=None, compression=None, ping_interval=None,
                              open_timeout=3, **kwargs)


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    """Accepts, then sends back every message as it came, until the client goes."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", **{k: v for k, v in message.items() if k in ("text", "bytes")}})


async def test_echoes_text_and_binary_both_ways() -> None:
    async with running(echo_app) as (url, _), connect(url + "/x") as ws:
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\x01\xff")
        assert await ws.recv() == b"\x00\x01\xff"
        big = "y" * 70_000  # the 64-bit length form
        await ws.send(big)
        assert await ws.recv() == big


async def test_fragmented_message_arrives_whole() -> None:
    """RFC 6455 5.4: a message may be split into fragments; the app gets it whole."""
    async with running(echo_app) as (url, _), connect(url) as ws:
        await ws.send(["frag", "men", "ted"])
        assert await ws.recv() == "fragmented"


async def test_scope_carries_path_query_headers_subprotocols_and_the_extension() -> None:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.update(scope)
        await receive()
        await send({"type": "websocket.accept", "subprotocol": "chat.v2",
                    "headers": [(b"x-echo", b"yes")]})
        await receive()

    async with running(app) as (url, _), connect(url + "/a%20b/c?x=1&y=2",
                                                  subprotocols=["chat.v1", "chat.v2"],
                                                  additional_headers={"X-Custom": "Value"}) as ws:
        assert ws.subprotocol == "chat.v2"
        assert ws.response.headers["x-echo"] == "yes"
    assert seen["path"] == "/a b/c" and seen["raw_path"] == b"/a%20b/c"
    assert seen["query_string"] == b"x=1&y=2"
    assert (b"x-custom", b"Value") in seen["headers"]
    assert seen["subprotocols"] == ["chat.v1", "chat.v2"]
    assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "ws"
    assert isinstance(seen["extensions"][EXTENSION]["connection"], EchoWebSocketProtocol)


async def test_close_before_accept_is_a_403_and_a_return_without_accept_a_500() -> None:
    async def refuses(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.close"})

    async def forgets(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    for app, status in ((refuses, 403), (forgets, 500)):
        async with running(app) as (url, _):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url):
                    pass
            assert refused.value.response.status_code == status


async def test_not_a_websocket_handshake_gets_a_400_without_running_the_app() -> None:
    calls: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        calls.append(scope)

    async with running(app) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")  # no Sec-WebSocket-Key
        status = await asyncio.wait_for(reader.readline(), 3)
        writer.close()
    assert status.split()[1] == b"400"
    assert calls == []


async def test_app_close_gives_the_code_and_the_client_hears_it() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 4001, "reason": "bye"})
        assert (await receive())["type"] == "websocket.disconnect"

    async with running(app) as (url, _), connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")


async def test_client_close_tells_the_app_code_and_reason() -> None:
    told: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        told.set_result(await receive())
        assert (await receive())["type"] == "websocket.disconnect"  # asked again: no hang

    async with running(app) as (url, _):
        async with connect(url) as ws:
            await ws.close(4002, "going")
        message = await asyncio.wait_for(told, 3)
    assert message == {"type": "websocket.disconnect", "code": 4002, "reason": "going"}


async def test_send_after_close_raises_an_oserror() -> None:
    raised: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await receive()  # the client's close
        try:
            await send({"type": "websocket.send", "text": "late"})
        except BaseException as exc:
            raised.set_result(exc)
            raise

    async with running(app) as (url, _):
        async with connect(url):
            pass
        assert isinstance(await asyncio.wait_for(raised, 3), OSError)


async def test_oversize_message_is_closed_1009_and_bad_utf8_1007() -> None:
    told: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        told.append(await receive())

    async with running(app, ws_max_size=1000) as (url, _):
        async with connect(url) as ws:
            await ws.send("z" * 1001)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
        mask = b"\x01\x02\x03\x04"
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\xff\xfe"))
        writer.write(bytes((0x81, 0x80 | 2)) + mask + payload)  # a text frame that is not UTF-8
        reply = await asyncio.wait_for(reader.readexactly(4), 3)
        writer.close()
        assert reply[0] == 0x88 and struct.unpack("!H", reply[2:4])[0] == 1007
    assert [m["code"] for m in told] == [1009, 1007]


async def test_ping_is_answered_with_its_payload() -> None:
    async with running(echo_app) as (url, _), connect(url) as ws:
        pong = await ws.ping(b"are you there")
        assert await asyncio.wait_for(pong, 3) >= 0


async def test_direct_write_encodes_a_message_once_for_every_recipient() -> None:
    connections: list[EchoWebSocketProtocol] = []
    ready = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        connections.append(scope["extensions"][EXTENSION]["connection"])
        if len(connections) == 3:
            ready.set()
        await receive()

    async with running(app) as (url, _):
        clients = [await connect(url).__aenter__() for _ in range(3)]
        await asyncio.wait_for(ready.wait(), 3)
        message: dict[str, Any] = {"type": "websocket.send", "text": "to all"}
        assert all(conn.write(message) for conn in connections)
        assert message[FRAME] == encode_frame({"text": "to all"}) == b"\x81\x06to all"
        assert [await c.recv() for c in clients] == ["to all"] * 3
        # what one pass of the loop writes to a connection leaves in one write, in order
        first, second = ({"type": "websocket.send", "text": t} for t in ("one", "two"))
        assert connections[0].write(first) and connections[0].write(second)
        assert connections[0].gathered == [b"\x81\x03one", b"\x81\x03two"]
        await asyncio.sleep(0)
        assert connections[0].gathered is None
        assert [await clients[0].recv(), await clients[0].recv()] == ["one", "two"]
        for client in clients:
            await client.close()


async def test_direct_write_waits_for_a_client_that_stops_reading() -> None:
    """Flow control: past the transport's high-water mark ``write`` says False, and
    ``writable`` returns once the client has read its backlog."""
    result: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        conn: EchoWebSocketProtocol = scope["extensions"][EXTENSION]["connection"]
        chunk: dict[str, Any] = {"type": "websocket.send", "bytes": b"x" * 65536}
        written = 0
        while conn.write(chunk):
            written += 1
            await asyncio.sleep(0)
        await conn.writable()
        assert conn.write(chunk)
        result.set_result((written, 1))
        await receive()

    async with running(app) as (url, _):
        async with connect(url, max_queue=1, max_size=None) as ws:
            await asyncio.sleep(0.5)  # not reading: the server's buffer fills
            assert not result.done()
            while not result.done():
                await asyncio.wait_for(ws.recv(), 3)
            written, _ = result.result()
            assert written > 4  # the kernel and the client's buffers took a few first


async def test_server_shutdown_closes_open_sockets_with_1012() -> None:
    async with running(echo_app) as (url, server):
        ws = await connect(url).__aenter__()
        server.should_exit = True
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


async def test_a_connection_leaves_no_cycle_for_the_garbage_collector() -> None:
    """Its objects go by reference counting, so full collections (whose pause grows with the
    heap) have nothing of it to find: a connect storm's collections found ~17 objects per
    upgrade (uvicorn's HTTP protocol and its parser, holding each other), and a client gone
    mid-frame left websockets' parser error holding the protocol through its traceback."""
    server_side = {"EchoWebSocketProtocol", "GuardedHttpProtocol", "HttpRequestParser",
                   "ServerProtocol", "FlowControl"}
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with running(echo_app, http=guarded_protocol(Guard(5, 0))) as (url, _):
            for _ in range(10):
                async with connect(url) as ws:
                    await ws.send("x")
                    assert await ws.recv() == "x"
            port = int(url.rsplit(":", 1)[1])
            for _ in range(10):  # gone in the middle of a frame, without a close
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: "
                             b"Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n")
                assert b" 101 " in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
                writer.write(bytes((0x81, 0x80 | 100)) + b"\x01\x02")  # 100 bytes promised
                await writer.drain()
                writer.close()
                await writer.wait_closed()
            await asyncio.sleep(0.3)  # every close handled
        gc.collect()
        left = collections.Counter(type(o).__qualname__.rsplit(".", 1)[-1] for o in gc.garbage)
        assert not {kind: n for kind, n in left.items() if kind in server_side}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()

"""The native transport against the Engine.IO v4 and Socket.IO v5 protocol documents.

Each test names the rule it checks (the spec's wording where it has one). The server is the
real thing: NativeTransport under uvicorn on a free loopback port, with Echo's own WebSocket
protocol (as Echo runs it) and again with uvicorn's websockets-sansio (any ASGI server must
do), in the test's event loop, with a small Handler; clients are raw HTTP (httpx),
raw WebSockets (websockets) and python-socketio's AsyncClient.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio  # type: ignore[import-untyped]
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.asyncio.client import ClientConnection

from echo.transport.base import Connection, Frame, Refused, TransportOptions
from echo.transport.native.server import NativeTransport
from echo.transport.websocket_protocol import EchoWebSocketProtocol
from tests.conftest import free_port, require_node_clients

pytestmark = [pytest.mark.anyio, pytest.mark.unit]

ACCEPTED = ("/", "/ok", "/other")


class Recorder:
    """The test Handler: accepts ACCEPTED namespaces, refuses the rest, records every call."""

    def __init__(self) -> None:
        self.transport: NativeTransport
        self.connects: list[tuple[Connection, Any]] = []
        self.events: list[tuple[str, str, list[Any], int | None]] = []
        self.disconnects: list[tuple[str, str, str, frozenset[str]]] = []
        self.order: list[str] = []
        self.changed = asyncio.Event()

    def _note(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def wait(self, predicate: Any, timeout: float = 3.0) -> None:
        """Until ``predicate()`` holds (looked at on each handler call, and every 10 ms)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.01)

    def conn(self, index: int = -1) -> Connection:
        return self.connects[index][0]

    async def connect(self, conn: Connection, auth: Any) -> None:
        if conn.namespace not in ACCEPTED:
            raise Refused("Invalid namespace")
        if isinstance(auth, dict) and "refuse" in auth:
            raise Refused("refused by the test", {"why": auth["refuse"]})
        if isinstance(auth, dict) and "slow" in auth:
            await asyncio.sleep(auth["slow"])
        if isinstance(auth, dict) and "room" in auth:
            self.transport.join(conn, auth["room"])
        if isinstance(auth, dict) and auth.get("greet"):
            conn.emit("auth", auth)  # sent during connect: must follow the CONNECT answer
        self.connects.append((conn, auth))
        self._note()

    async def event(self, conn: Connection, event: str, args: list[Any], ack_id: int | None) -> None:
        self.events.append((conn.sid, event, args, ack_id))
        if event == "join":
            self.transport.join(conn, args[0])
        elif event == "echo":
            if ack_id is None:
                conn.emit("echo", *args)
        elif event == "slow":
            await asyncio.sleep(args[0])
            self.order.append("slow done")
        elif event == "close-me":
            await conn.close()
        elif event == "boom":
            raise RuntimeError("boom: " + "x" * 5000)
        if ack_id is not None:
            conn.ack(ack_id, *args)
        self._note()

    async def disconnect(self, conn: Connection, reason: str) -> None:
        self.disconnects.append((conn.sid, conn.namespace, reason, conn.rooms))
        self.order.append("disconnect " + reason)
        self._note()


async def _hello(request: Any) -> PlainTextResponse:
    return PlainTextResponse("hello from the other app")


WS_SERVERS: dict[str, Any] = {"echo": EchoWebSocketProtocol, "uvicorn": "websockets-sansio"}
ws_server: contextvars.ContextVar[str] = contextvars.ContextVar("ws_server", default="echo")


@pytest.fixture(autouse=True, params=sorted(WS_SERVERS))
def websocket_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test runs on Echo's WebSocket protocol and on uvicorn's own."""
    token = ws_server.set(request.param)
    yield request.param
    ws_server.reset(token)


class Served:
    def __init__(self, transport: NativeTransport, handler: Recorder, port: int,
                 lifespan: list[str], websocket_calls: set[object]) -> None:
        self.transport = transport
        self.handler = handler
        self.websocket_calls = websocket_calls
        """The WebSocket ASGI calls of the server not returned yet."""
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/socket.io/"
        self.lifespan = lifespan

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, trust_env=False, timeout=5)

    async def ws(self, query: str = "EIO=4&transport=websocket", **kwargs: Any) -> ClientConnection:
        return await websockets.connect(f"{self.ws_url}?{query}", proxy=None, compression=None,
                                        ping_interval=None, open_timeout=3, **kwargs)


@contextlib.asynccontextmanager
async def serving(**options: Any) -> AsyncIterator[Served]:
    handler = Recorder()
    transport = NativeTransport(handler, TransportOptions(**options))
    handler.transport = transport
    lifespan: list[str] = []

    @contextlib.asynccontextmanager
    async def other_lifespan(app: Starlette) -> AsyncIterator[None]:
        lifespan.append("startup")
        yield
        lifespan.append("shutdown")

    other = Starlette(routes=[Route("/hello", _hello)], lifespan=other_lifespan)
    inner = transport.asgi(other)
    websocket_calls: set[object] = set()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await inner(scope, receive, send)
            return
        call = object()
        websocket_calls.add(call)
        try:
            await inner(scope, receive, send)
        finally:
            websocket_calls.discard(call)

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ws=WS_SERVERS[ws_server.get()],
                            ws_per_message_deflate=False, ws_ping_interval=None, lifespan="on",
                            log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(5):
        while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await asyncio.sleep(0.005)
    await transport.start()
    try:
        yield Served(transport, handler, port, lifespan, websocket_calls)
    finally:
        await transport.close()
        server.should_exit = True
        await task


# --- client helpers ------------------------------------------------------------------------


async def recv(ws: ClientConnection, timeout: float = 3.0, pong: bool = True) -> str | bytes:
    """The next message that is not a PING (answered, unless ``pong`` is False)."""
    async with asyncio.timeout(timeout):
        while True:
            message = await ws.recv()
            if message == "2":
                if pong:
                    await ws.send("3")
                continue
            return message


async def ws_session(served: Served, **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await served.ws(**kwargs)
    opening = await recv(ws)
    assert isinstance(opening, str) and opening[0] == "0"
    return ws, json.loads(opening[1:])


async def ws_connected(served: Served, namespace: str = "/ok",
                       auth: dict[str, Any] | None = None) -> tuple[ClientConnection, str]:
    ws, _ = await ws_session(served)
    head = "40" if namespace == "/" else f"40{namespace},"
    await ws.send(head + (json.dumps(auth) if auth is not None else ""))
    answer = await recv(ws)
    assert isinstance(answer, str) and answer.startswith(head + "{"), answer
    return ws, json.loads(answer[len(head):])["sid"]


async def closed(ws: ClientConnection, timeout: float = 3.0) -> int | None:
    """Read until the server closes ``ws``; its close code."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await ws.recv()
    await ws.wait_closed()
    return ws.close_code


def query(sid: str | None = None, transport: str = "polling") -> str:
    return f"/socket.io/?EIO=4&transport={transport}" + (f"&sid={sid}" if sid else "")


async def poll_open(http: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    response = await http.get(query())
    assert response.status_code == 200 and response.text[0] == "0"
    opening = json.loads(response.text[1:])
    return opening["sid"], opening


async def poll_connected(http: httpx.AsyncClient, namespace: str = "/ok") -> str:
    sid, _ = await poll_open(http)
    assert (await http.post(query(sid), content=f"40{namespace},")).text == "ok"
    answer = (await http.get(query(sid))).text
    assert answer.startswith(f"40{namespace},{{"), answer
    return sid


def error(response: httpx.Response) -> tuple[int, int, str]:
    body = response.json()
    return response.status_code, body["code"], body["message"]


async def ws_refused(served: Served, query_string: str) -> int:
    """The HTTP status a WebSocket handshake is refused with (403: the socket is closed before
    it opens)."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await served.ws(query_string)
    return refused.value.response.status_code


# --- Engine.IO: handshake ------------------------------------------------------------------


async def test_eio_polling_handshake_open_packet_has_the_spec_fields() -> None:
    """Handshake: 'the server MUST respond with an open packet' with sid, upgrades,
    pingInterval, pingTimeout (ms), maxPayload; polling may upgrade to websocket."""
    async with serving(ping_interval=0.3, ping_timeout=0.2) as served, served.http() as http:
        _, opening = await poll_open(http)
        assert set(opening) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
        assert isinstance(opening["sid"], str) and opening["sid"]
        assert opening["upgrades"] == ["websocket"]
        assert opening["maxPayload"] == 1_000_000


async def test_eio_sub_second_ping_interval_sent_as_integer_ms() -> None:
    """pingInterval/pingTimeout are milliseconds: 0.3 s is 300, not truncated to 0."""
    async with serving(ping_interval=0.3, ping_timeout=0.2) as served, served.http() as http:
        _, opening = await poll_open(http)
        assert opening["pingInterval"] == 300 and type(opening["pingInterval"]) is int
        assert opening["pingTimeout"] == 200 and type(opening["pingTimeout"]) is int


async def test_eio_websocket_only_session_open_packet_has_no_upgrades() -> None:
    """WebSocket-only session: transport=websocket straight away, open packet, no upgrades."""
    async with serving() as served:
        ws, opening = await ws_session(served)
        assert opening["upgrades"] == []
        assert set(opening) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
        await ws.close()


async def test_eio_missing_or_invalid_eio_rejected_400_code_5() -> None:
    """'If a mandatory query parameter is missing, the server MUST respond with HTTP 400' (EIO)."""
    async with serving() as served, served.http() as http:
        for url in ("/socket.io/?transport=polling", "/socket.io/?EIO=abc&transport=polling",
                    "/socket.io/?EIO=3&transport=polling"):
            assert error(await http.get(url)) == (400, 5, "Unsupported protocol version")
        assert await ws_refused(served, "transport=websocket") == 403
        assert await ws_refused(served, "EIO=abc&transport=websocket") == 403


async def test_eio_unknown_transport_rejected_400_code_0() -> None:
    """A missing or unknown transport: HTTP 400 'Transport unknown'; WebSocket refused."""
    async with serving() as served, served.http() as http:
        for url in ("/socket.io/?EIO=4", "/socket.io/?EIO=4&transport=abc"):
            assert error(await http.get(url)) == (400, 0, "Transport unknown")
        assert await ws_refused(served, "EIO=4") == 403
        assert await ws_refused(served, "EIO=4&transport=abc") == 403


async def test_eio_handshake_with_post_or_put_rejected_400_code_2() -> None:
    """The handshake is a GET: POST/PUT without a sid get 400 'Bad handshake method'."""
    async with serving() as served, served.http() as http:
        assert error(await http.post(query(), content="40")) == (400, 2, "Bad handshake method")
        assert error(await http.put(query(), content="40")) == (400, 2, "Bad handshake method")


async def test_eio_unknown_sid_rejected_400_code_1() -> None:
    """'The server MUST return an HTTP 400 response if the session ID is not known' (GET, POST,
    WebSocket)."""
    async with serving() as served, served.http() as http:
        assert error(await http.get(query("nope"))) == (400, 1, "Session ID unknown")
        assert error(await http.post(query("nope"), content="40")) == (400, 1, "Session ID unknown")
        assert await ws_refused(served, "EIO=4&transport=websocket&sid=nope") == 403


async def test_asgi_other_paths_and_lifespan_go_to_the_wrapped_app() -> None:
    """Everything but /socket.io/ (and the lifespan) is the wrapped app's."""
    async with serving() as served, served.http() as http:
        assert served.lifespan == ["startup"]
        response = await http.get("/hello")
        assert response.status_code == 200 and response.text == "hello from the other app"
        assert (await http.get("/socket.io.js")).status_code == 404


# --- Engine.IO: long-polling ---------------------------------------------------------------


async def test_eio_post_answer_is_lowercase_ok() -> None:
    """'the server MUST return an HTTP 200 response, with the string ok in the response body'."""
    async with serving() as served, served.http() as http:
        sid, _ = await poll_open(http)
        response = await http.post(query(sid), content="40/ok,")
        assert response.status_code == 200 and response.text == "ok"


async def test_eio_polling_post_with_many_packets_all_delivered() -> None:
    """Payloads of ANY packet count: 50 acked events in one POST, 50 acks (python-engineio
    drops every packet of a POST holding more than 16)."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        body = "\x1e".join(f'42/ok,{i}["echo",{i}]' for i in range(50))
        assert (await http.post(query(sid), content=body)).text == "ok"
        answer = (await http.get(query(sid))).text.split("\x1e")
        assert answer == [f"43/ok,{i}[{i}]" for i in range(50)]
        assert [args for _, _, args, _ in served.handler.events] == [[i] for i in range(50)]


async def test_eio_polling_get_response_joins_packets_with_record_separator() -> None:
    """Several packets for a GET are one payload separated by \\x1e, in order."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        conn = served.handler.conn()
        for i in range(3):
            conn.emit("n", i)
        assert conn.backlog() == 3  # waiting for the client's GET
        with pytest.raises(TypeError):
            conn.emit("n", {1, 2})  # not JSON: the caller hears it, nothing is sent
        assert (await http.get(query(sid))).text == '42/ok,["n",0]\x1e42/ok,["n",1]\x1e42/ok,["n",2]'
        assert conn.backlog() == 0


async def test_eio_polling_binary_packets_are_base64_with_b_prefix() -> None:
    """'Binary payloads MUST be base64-encoded and prefixed with a b character' (both ways)."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        attachment = "b" + base64.b64encode(b"\x01\x02\x03\x04").decode()
        body = '451-/ok,7["echo",{"_placeholder":true,"num":0}]\x1e' + attachment
        assert (await http.post(query(sid), content=body)).text == "ok"
        assert served.handler.events[-1][2] == [b"\x01\x02\x03\x04"]
        answer = (await http.get(query(sid))).text.split("\x1e")
        assert answer == ['461-/ok,7[{"_placeholder":true,"num":0}]', "bAQIDBA=="]


async def test_eio_pending_get_released_by_a_write() -> None:
    """'Once there are some packets to be sent, the server SHOULD ... send them' to the GET."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        served.transport.join(served.handler.conn(), "room")
        pending = asyncio.create_task(http.get(query(sid)))
        await asyncio.sleep(0.1)
        assert not pending.done()
        assert served.transport.write("/ok", "room", Frame.event("/ok", "news", 1)) == 1
        assert (await pending).text == '42/ok,["news",1]'


async def test_eio_second_concurrent_get_is_400_and_closes_session() -> None:
    """'a client MUST NOT have more than one active GET request. Should it happen, the server
    MUST return an HTTP 400 error status and close the session' (the pending GET gets close)."""
    async with serving() as served, served.http() as http:
        sid, _ = await poll_open(http)
        first = asyncio.create_task(http.get(query(sid)))
        await asyncio.sleep(0.1)
        second = await http.get(query(sid))
        assert error(second)[:2] == (400, 3)
        assert (await first).text == "1"
        assert error(await http.get(query(sid)))[:2] == (400, 1)


async def test_eio_second_concurrent_post_is_400_and_closes_session() -> None:
    """'a client MUST NOT have more than one active POST request. Should it happen, the server
    MUST return an HTTP 400 error status and close the session'."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        first = asyncio.create_task(http.post(query(sid), content='42/ok,["slow",0.3]'))
        await asyncio.sleep(0.1)
        assert error(await http.post(query(sid), content='42/ok,["echo",1]'))[:2] == (400, 3)
        await first
        assert error(await http.get(query(sid)))[:2] == (400, 1)
        await served.handler.wait(lambda: served.handler.disconnects)
        assert served.handler.disconnects[0][2] == "transport error"


async def test_eio_invalid_packet_closes_session_polling() -> None:
    """'closes the session upon invalid packet format' (POST 'abc' → 400, session gone)."""
    async with serving() as served, served.http() as http:
        sid, _ = await poll_open(http)
        assert (await http.post(query(sid), content="abc")).status_code == 400
        assert error(await http.get(query(sid)))[:2] == (400, 1)


async def test_eio_polling_post_over_max_payload_is_413() -> None:
    """maxPayload: a POST body over it is answered 413 (and the session closed)."""
    async with serving(max_payload=1000) as served, served.http() as http:
        sid = await poll_connected(http)
        response = await http.post(query(sid), content='42/ok,["echo","' + "x" * 1000 + '"]')
        assert response.status_code == 413
        assert not served.handler.events
        assert error(await http.get(query(sid)))[:2] == (400, 1)


async def test_eio_client_close_packet_polling_ends_pending_get_with_noop() -> None:
    """'forcefully closes the session': POST '1' ends the pending GET with noop; sid unknown after."""
    async with serving() as served, served.http() as http:
        sid, _ = await poll_open(http)
        pending = asyncio.create_task(http.get(query(sid)))
        await asyncio.sleep(0.1)
        assert (await http.post(query(sid), content="1")).text == "ok"
        assert (await pending).text == "6"
        assert error(await http.get(query(sid)))[:2] == (400, 1)


async def test_eio_server_close_gives_polling_client_close_packet() -> None:
    """Closing on the server side: a polling client gets the close packet (1)."""
    async with serving() as served, served.http() as http:
        sid, _ = await poll_open(http)
        between = (await poll_open(http))[0]
        pending = asyncio.create_task(http.get(query(sid)))
        await asyncio.sleep(0.1)
        await served.transport.close()
        assert (await pending).text == "1"
        assert (await http.get(query(between))).text == "1"  # its next GET, if between two
        assert error(await http.get(query(between)))[:2] == (400, 1)
        assert error(await http.get(query()))[0] == 503  # no new sessions once closed


async def test_polling_cors_echoes_allowed_origin_and_answers_preflight() -> None:
    """CORS for polling: an allowed Origin is echoed (with credentials), OPTIONS preflight is
    answered, a disallowed Origin is refused."""
    async with serving(cors_origins=("http://app.example",)) as served, served.http() as http:
        response = await http.get(query(), headers={"Origin": "http://app.example"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert response.headers["access-control-allow-credentials"] == "true"
        preflight = await http.options(query(), headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert preflight.headers["access-control-allow-headers"] == "content-type"
        evil = await http.get(query(), headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers
        with pytest.raises(websockets.InvalidStatus):
            await served.ws(origin="http://evil.example")
    async with serving() as served, served.http() as http:  # "*": any origin, echoed
        response = await http.get(query(), headers={"Origin": "http://anything.example"})
        assert response.headers["access-control-allow-origin"] == "http://anything.example"


# --- Engine.IO: WebSocket ------------------------------------------------------------------


async def test_eio_invalid_packet_closes_session_websocket() -> None:
    """'closes the session upon invalid packet format' on WebSocket."""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send("abc")
        await closed(ws)


async def test_eio_client_ping_is_invalid_in_v4() -> None:
    """v4 reversed the heartbeat: only the server pings; a client PING closes the session."""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send("2")
        await closed(ws)


async def test_eio_client_close_packet_websocket_closes_it() -> None:
    """'forcefully closes the session': close packet over WebSocket → the socket is closed."""
    async with serving() as served:
        ws, sid = await ws_connected(served)
        await ws.send("1")
        await closed(ws)
        await served.handler.wait(lambda: served.handler.disconnects)
        assert served.handler.disconnects == [(sid, "/ok", "transport close", frozenset())]


async def test_eio_ws_message_over_max_payload_closes_1009() -> None:
    """maxPayload: a WebSocket message over it closes the socket with 1009 (message too big)."""
    async with serving(max_payload=1000) as served:
        ws, _ = await ws_connected(served)
        await ws.send('42/ok,["echo","' + "é" * 600 + '"]')  # 600 characters, 1200 bytes
        assert await closed(ws) == 1009
        assert not served.handler.events
        ws, _ = await ws_connected(served)
        await ws.send('451-/ok,["echo",{"_placeholder":true,"num":0}]')
        await ws.send(b"\x00" * 1001)
        assert await closed(ws) == 1009


async def test_eio_upgrade_probe_noop_then_upgrade() -> None:
    """Upgrade: 2probe → 3probe, the pending GET released with a noop (6), then 5; what was
    written meanwhile arrives on the WebSocket, in order."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        conn = served.handler.conn()
        pending = asyncio.create_task(http.get(query(sid)))
        await asyncio.sleep(0.1)
        ws = await served.ws(f"EIO=4&transport=websocket&sid={sid}")
        await ws.send("2probe")
        assert await recv(ws) == "3probe"
        assert (await pending).text == "6"
        conn.emit("during", 1)
        conn.emit("during", 2)
        assert conn.transport_name == "polling"
        await ws.send("5")
        assert await recv(ws) == '42/ok,["during",1]'
        assert await recv(ws) == '42/ok,["during",2]'
        assert conn.transport_name == "websocket"
        await ws.send('42/ok,3["echo","hello"]')
        assert await recv(ws) == '43/ok,3["hello"]'
        await ws.close()


async def test_eio_pending_get_released_only_once_the_probe_is_answered() -> None:
    """A probe WebSocket that has not sent ``2probe`` yet does not end the GETs (the client
    would poll in a loop): the pending GET is released with the ``3probe``, and a GET after
    it is answered ``noop`` at once."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        ws = await served.ws(f"EIO=4&transport=websocket&sid={sid}")
        await served.handler.wait(lambda: served.transport.sessions[sid].probe_send is not None)
        pending = asyncio.create_task(http.get(query(sid)))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await ws.send("2probe")
        assert await recv(ws) == "3probe"
        assert (await asyncio.wait_for(pending, 3)).text == "6"
        assert (await asyncio.wait_for(http.get(query(sid)), 1)).text == "6"
        await ws.send("5")
        await served.handler.wait(lambda: served.handler.conn().transport_name == "websocket")
        await ws.close()


async def test_eio_polling_requests_rejected_after_upgrade() -> None:
    """'ignores HTTP requests with same sid after upgrade': 400."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        ws = await served.ws(f"EIO=4&transport=websocket&sid={sid}")
        await ws.send("2probe")
        await ws.send("5")
        assert await recv(ws) == "3probe"
        await served.handler.wait(lambda: served.handler.conn().transport_name == "websocket")
        assert error(await http.get(query(sid)))[:2] == (400, 3)
        assert error(await http.post(query(sid), content='42/ok,["echo"]'))[:2] == (400, 3)
        await ws.send('42/ok,1["echo","still here"]')
        assert await recv(ws) == '43/ok,1["still here"]'


async def ws_closed_unheard(served: Served, query_string: str) -> int | None:
    """Open a WebSocket the server closes at once, before sending it anything; its code."""
    ws = await served.ws(query_string)
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 3)
    return ws.close_code


async def test_eio_second_websocket_for_same_sid_rejected() -> None:
    """'A client MUST NOT open more than one WebSocket connection per session. Should it happen,
    the server MUST close the WebSocket connection' — during the probe, after the upgrade and
    for a WebSocket-only session; the first socket keeps the session (pings and writes)."""
    async with serving(ping_interval=0.3, ping_timeout=3) as served, served.http() as http:
        sid = await poll_connected(http)
        probing = await served.ws(f"EIO=4&transport=websocket&sid={sid}")
        assert await ws_closed_unheard(served, f"EIO=4&transport=websocket&sid={sid}") == 1008
        await probing.send("2probe")
        assert await recv(probing) == "3probe"
        assert await ws_closed_unheard(served, f"EIO=4&transport=websocket&sid={sid}") == 1008
        await probing.send("5")
        await served.handler.wait(lambda: served.handler.conn().transport_name == "websocket")
        assert await ws_closed_unheard(served, f"EIO=4&transport=websocket&sid={sid}") == 1008
        assert await probing.recv() == "2"  # the session's pings still come here
        await probing.send("3")
        served.handler.conn().emit("hello")
        assert await recv(probing) == '42/ok,["hello"]'

        only, opening = await ws_session(served)
        assert await ws_closed_unheard(served, f"EIO=4&transport=websocket&sid={opening['sid']}") == 1008
        await only.send("40/ok,")
        assert str(await recv(only)).startswith('40/ok,{"sid":')


async def test_eio_failed_probe_leaves_polling_session_working() -> None:
    """An upgrade that goes wrong (no 2probe) is dropped; the session stays on polling."""
    async with serving() as served, served.http() as http:
        sid = await poll_connected(http)
        ws = await served.ws(f"EIO=4&transport=websocket&sid={sid}")
        await ws.send("4hello")
        await closed(ws)
        assert (await http.post(query(sid), content='42/ok,5["echo",1]')).text == "ok"
        assert (await http.get(query(sid))).text == "43/ok,5[1]"


async def test_eio_server_close_closes_websocket() -> None:
    """Closing on the server side closes the WebSocket."""
    async with serving() as served:
        ws, _ = await ws_connected(served)
        await served.transport.close()
        assert await closed(ws) == 1001
        await served.handler.wait(lambda: served.handler.disconnects)
        assert served.handler.disconnects[0][2] == "transport close"


# --- Engine.IO: heartbeat ------------------------------------------------------------------


async def test_eio_heartbeat_ping_pong_websocket() -> None:
    """'At a given interval the server sends a ping packet and the client has pingTimeout to
    send a pong': answered pings keep the session open."""
    async with serving(ping_interval=0.1, ping_timeout=0.1) as served:
        ws, _ = await ws_session(served)
        for _ in range(3):
            assert await ws.recv() == "2"
            await ws.send("3")
        assert served.transport.sessions


async def test_eio_heartbeat_ping_pong_polling() -> None:
    """The same on long-polling: the GET gets 2, the POST answers 3, three times."""
    async with serving(ping_interval=0.1, ping_timeout=0.2) as served, served.http() as http:
        sid, _ = await poll_open(http)
        for _ in range(3):
            assert (await http.get(query(sid))).text == "2"
            assert (await http.post(query(sid), content="3")).text == "ok"


async def test_eio_polling_ping_timeout_closes_session() -> None:
    """'If the server does not receive a pong packet back, it SHOULD consider that the
    connection is closed' (polling: the sid is unknown afterwards)."""
    async with serving(ping_interval=0.1, ping_timeout=0.1) as served, served.http() as http:
        sid, _ = await poll_open(http)
        await asyncio.sleep(0.35)
        assert error(await http.get(query(sid)))[:2] == (400, 1)


async def test_eio_ping_deadline_is_exact() -> None:
    """The ping timeout fires at pingInterval + pingTimeout, on a timer of its own (not a
    1 s-granular scan)."""
    async with serving(ping_interval=0.2, ping_timeout=0.15) as served:
        ws = await served.ws()
        started = time.monotonic()
        await ws.recv()  # open
        assert await ws.recv() == "2"
        pinged = time.monotonic() - started
        await closed(ws)
        ended = time.monotonic() - started
        assert 0.15 <= pinged <= 0.3, pinged
        assert 0.33 <= ended <= 0.5, ended


async def test_eio_ping_timeout_closes_websocket_and_ignores_later_packets() -> None:
    """A client that stops answering pings is closed, its WebSocket too, and nothing it sends
    after the deadline reaches the handler."""
    async with serving(ping_interval=0.1, ping_timeout=0.1) as served:
        ws, sid = await ws_connected(served)
        assert await ws.recv() == "2"  # not answered
        await asyncio.sleep(0.2)
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.send('42/ok,["echo","too late"]')
        await closed(ws, timeout=1)
        await served.handler.wait(lambda: served.handler.disconnects)
        assert served.handler.disconnects == [(sid, "/ok", "ping timeout", frozenset())]
        await asyncio.sleep(0.1)
        assert not served.handler.events


async def test_eio_only_pong_refreshes_the_ping_deadline() -> None:
    """'the client has pingTimeout to send a pong packet back': other packets (here an event
    every 30 ms) do not move the deadline."""
    async with serving(ping_interval=0.15, ping_timeout=0.15) as served:
        ws, _ = await ws_connected(served)
        started = time.monotonic()

        async def chatter() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    await ws.send('42/ok,["hello"]')
                    await asyncio.sleep(0.03)

        talking = asyncio.create_task(chatter())
        await closed(ws, timeout=2)
        talking.cancel()
        assert time.monotonic() - started < 0.45
        assert served.handler.events  # they were handled, and still did not count


# --- Socket.IO: connect --------------------------------------------------------------------


async def test_sio_connect_main_namespace_answers_sid() -> None:
    """'the server MUST respond with a CONNECT packet ... with the session ID in the payload'
    (main namespace: 40 → 40{"sid":...}; the Socket.IO sid is not the Engine.IO one)."""
    async with serving() as served:
        ws, opening = await ws_session(served)
        await ws.send("40")
        answer = await recv(ws)
        assert isinstance(answer, str) and answer.startswith("40{")
        handshake = json.loads(answer[2:])
        assert set(handshake) == {"sid"} and handshake["sid"] != opening["sid"]
        assert served.handler.connects[0][1] is None


async def test_sio_connect_custom_namespace_with_and_without_trailing_comma() -> None:
    """CONNECT to a custom namespace: '40/ok,' and '40/ok' both name /ok."""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send("40/ok")
        assert str(await recv(ws)).startswith('40/ok,{"sid":')
        await ws.send("40/other,")
        assert str(await recv(ws)).startswith('40/other,{"sid":')


async def test_sio_connect_auth_payload_reaches_handler() -> None:
    """'the CONNECT packet now can contain a payload' → Handler.connect(conn, auth); what the
    handler emits while connecting follows the CONNECT answer."""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send('40/ok,{"token":"123","greet":true}')
        assert str(await recv(ws)).startswith('40/ok,{"sid":')
        assert await recv(ws) == '42/ok,["auth",{"token":"123","greet":true}]'
        assert served.handler.connects[0][1] == {"token": "123", "greet": True}


async def test_sio_refused_connect_answers_connect_error() -> None:
    """'or a CONNECT_ERROR packet if the connection is not allowed': 44/ns,{"message"[,"data"]}."""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send("40/random")
        assert await recv(ws) == '44/random,{"message":"Invalid namespace"}'
        await ws.send('40/ok,{"refuse":"no"}')
        assert await recv(ws) == '44/ok,{"message":"refused by the test","data":{"why":"no"}}'
        await ws.send("40/ok,")  # the session stays usable
        assert str(await recv(ws)).startswith('40/ok,{"sid":')
        assert not served.handler.disconnects


async def test_sio_first_packet_must_be_connect() -> None:
    """'If the server does not receive a CONNECT packet first, then it MUST close the
    connection immediately.'"""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send('42["echo",1]')
        await closed(ws)
        assert not served.handler.events


async def test_sio_connect_timeout_closes_session() -> None:
    """connect_timeout: an Engine.IO session that connected no namespace in time is closed."""
    async with serving(connect_timeout=0.2) as served, served.http() as http:
        ws, _ = await ws_session(served)
        started = time.monotonic()
        await closed(ws)
        assert 0.15 <= time.monotonic() - started <= 0.5
        sid, _ = await poll_open(http)
        await asyncio.sleep(0.3)
        assert error(await http.get(query(sid)))[:2] == (400, 1)
        ws, _ = await ws_connected(served)  # connected in time: stays
        await asyncio.sleep(0.3)
        await ws.send('42/ok,1["echo"]')
        assert await recv(ws) == "43/ok,1[]"


async def test_sio_multiple_namespaces_on_one_session() -> None:
    """'A client MAY be connected to multiple namespaces at the same time, with the same
    underlying WebSocket connection.'"""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send("40/ok,")
        await ws.send("40/other,")
        await ws.send("40")
        for namespace in ("/ok,", "/other,", ""):
            assert str(await recv(ws)).startswith("40" + namespace + '{"sid":')
        await ws.send('42/other,1["echo","o"]')
        await ws.send('42/ok,2["echo","k"]')
        await ws.send('423["echo","main"]')
        assert [await recv(ws) for _ in range(3)] == ['43/other,1["o"]', '43/ok,2["k"]', '433["main"]']
        assert len({conn.sid for conn, _ in served.handler.connects}) == 3


async def test_sio_client_disconnect_calls_handler_and_keeps_session() -> None:
    """DISCONNECT from the client: Handler.disconnect(conn, 'client namespace disconnect');
    'The low-level connection MAY be kept alive if the client is connected to another
    namespace'."""
    async with serving() as served:
        ws, _ = await ws_session(served)
        await ws.send('40/ok,{"room":"r"}')
        await ws.send("40/other,")
        await recv(ws)
        await recv(ws)
        ok = served.handler.connects[0][0]
        await ws.send("41/ok,")
        await ws.send('42/other,1["echo","other still works"]')
        assert await recv(ws) == '43/other,1["other still works"]'
        assert served.handler.disconnects == [(ok.sid, "/ok", "client namespace disconnect",
                                               frozenset({"r"}))]
        assert not served.transport.has_members("/ok", "r") and ok.rooms == frozenset()
        await ws.send('42/ok,2["echo","gone"]')  # not connected any more: ignored
        await ws.send('42/other,3["echo"]')
        assert await recv(ws) == "43/other,3[]"


async def test_sio_event_for_unconnected_namespace_ignored() -> None:
    """An EVENT for a namespace the client is not connected to is not handled."""
    async with serving() as served:
        ws, _ = await ws_connected(served)
        await ws.send('42/other,1["echo","x"]')
        await ws.send('42/ok,2["echo","y"]')
        assert await recv(ws) == '43/ok,2["y"]'
        assert [event[2] for event in served.handler.events] == [["y"]]


# --- Socket.IO: events and acks ------------------------------------------------------------


async def test_sio_event_with_ack_id_answered_with_ack() -> None:
    """'The receiver MUST respond with an ACK packet with the same event ID'."""
    async with serving() as served:
        ws, _ = await ws_connected(served, "/")
        await ws.send('42456["echo",1,"2",{"3":[false]}]')
        assert await recv(ws) == '43456[1,"2",{"3":[false]}]'
        assert served.handler.events[0][1:] == ("echo", [1, "2", {"3": [False]}], 456)


async def test_sio_event_handler_failure_answers_the_ack_with_an_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A handler that raises does not leave the client's ack waiting: it gets an error body;
    the failure is logged, bounded; the connection goes on."""
    async with serving() as served:
        ws, _ = await ws_connected(served)
        with caplog.at_level(logging.ERROR, logger="echo.transport"):
            await ws.send('42/ok,7["boom",1]')
            answer = await recv(ws)
            await ws.send('42/ok,["boom"]')  # no ack asked: nothing comes back
            await ws.send('42/ok,8["echo","after"]')
            assert await recv(ws) == '43/ok,8["after"]'
        assert answer == '43/ok,7[{"ok":false,"error":{"code":"internal","message":"Internal server error"}}]'
        failures = [text for text in (record.getMessage() for record in caplog.records)
                    if "handler.event failed" in text]
        assert len(failures) == 2
        assert all("RuntimeError" in text and "test_transport_native.py" in text and len(text) < 1000
                   for text in failures)
        assert not any(record.exc_info for record in caplog.records)  # no unbounded traceback


async def test_sio_events_handled_in_order_one_at_a_time() -> None:
    """Events are awaited where they are read, in order: a slow one delays the next."""
    async with serving() as served:
        ws, _ = await ws_connected(served)
        await ws.send('42/ok,["slow",0.2]')
        for i in range(20):
            await ws.send(f'42/ok,{i}["echo",{i}]')
        assert [await recv(ws) for _ in range(20)] == [f"43/ok,{i}[{i}]" for i in range(20)]
        assert [event[1] for event in served.handler.events] == ["slow"] + ["echo"] * 20


async def test_sio_binary_event_reassembled_with_placeholders() -> None:
    """BINARY_EVENT '52-["message",{"_placeholder":true,"num":0},...]' + attachments: the
    handler gets bytes in their places; a binary ack goes back as 6N- + attachments."""
    async with serving() as served:
        ws, _ = await ws_connected(served, "/")
        await ws.send('452-789["echo",{"_placeholder":true,"num":0},{"x":{"_placeholder":true,"num":1}}]')
        await ws.send(b"\x01\x02\x03")
        await ws.send(b"\x04\x05\x06")
        assert await recv(ws) == '462-789[{"_placeholder":true,"num":0},{"x":{"_placeholder":true,"num":1}}]'
        assert await recv(ws) == b"\x01\x02\x03"
        assert await recv(ws) == b"\x04\x05\x06"
        assert served.handler.events[0][2] == [b"\x01\x02\x03", {"x": b"\x04\x05\x06"}]


async def test_sio_binary_attachment_count_bounded() -> None:
    """A binary packet announcing more attachments than max_attachments (9,999,999,999 here)
    closes the session at once; nothing is buffered."""
    async with serving(max_attachments=3) as served:
        ws, _ = await ws_connected(served)
        await ws.send('459999999999-/ok,["echo",{"_placeholder":true,"num":0}]')
        await closed(ws)
        ws, _ = await ws_connected(served)
        await ws.send('454-/ok,["echo"]')
        await closed(ws)
        ws, _ = await ws_connected(served)
        await ws.send('453-/ok,1["echo"]')
        for _ in range(3):
            await ws.send(b"x")
        assert await recv(ws) == "43/ok,1[]"
        assert len(served.handler.events) == 1


async def test_sio_binary_attachments_total_size_bounded() -> None:
    """The attachments of one packet may not add up to more than maxPayload."""
    async with serving(max_payload=1000) as served:
        ws, _ = await ws_connected(served)
        await ws.send('453-/ok,["echo"]')
        for _ in range(3):
            await ws.send(b"x" * 400)
        await closed(ws)
        assert not served.handler.events


MALFORMED = {
    "unknown packet type": "4abc",
    "bad JSON": '42/ok,["echo",',
    "event name not a string": "42/ok,[1]",
    "empty event array": "42/ok,[]",
    "non-array event payload": "42/ok,{}",
    "invalid ack id": '42/ok,abc["echo"]',
    "namespace without a slash": '42ok,["echo"]',
    "disconnect with a payload": '41/ok,{"a":1}',
    "connect with an array": "40/other,[1]",
    "binary without a count": '45/ok,["echo"]',
    "placeholder out of range": '450-/ok,["echo",{"_placeholder":true,"num":0}]',
    "ack id too long": '42/ok,1234567890123456["echo"]',
}


@pytest.mark.parametrize("packet", list(MALFORMED.values()), ids=list(MALFORMED))
async def test_sio_malformed_packet_closes_the_connection(packet: str) -> None:
    """'If that's not the case, then the receiver MUST close the connection' (and the
    parser's other rules)."""
    async with serving() as served:
        ws, sid = await ws_connected(served)
        await ws.send(packet)
        await closed(ws)
        await served.handler.wait(lambda: served.handler.disconnects)
        assert served.handler.disconnects == [(sid, "/ok", "parse error", frozenset())]
        assert not served.handler.events


async def test_sio_text_while_waiting_for_attachment_closes() -> None:
    """A binary packet's attachments come next; a text packet among them is invalid, and so is
    binary data nobody announced."""
    async with serving() as served:
        ws, _ = await ws_connected(served)
        await ws.send('451-/ok,["echo",{"_placeholder":true,"num":0}]')
        await ws.send('42/ok,["echo"]')
        await closed(ws)
        ws, _ = await ws_connected(served)
        await ws.send(b"\x00")
        await closed(ws)
        assert not served.handler.events


# --- Socket.IO: disconnects ----------------------------------------------------------------


async def test_sio_server_namespace_close_sends_disconnect_packet() -> None:
    """Connection.close(): DISCONNECT (41/ns,) to the client, Handler.disconnect once with
    'server namespace disconnect', even from the connection's own handler call."""
    async with serving() as served:
        ws, sid = await ws_connected(served)
        await ws.send('42/ok,["join","r"]')
        await ws.send('42/ok,["close-me"]')
        assert await recv(ws) == "41/ok,"
        await served.handler.wait(lambda: served.handler.disconnects)
        await asyncio.sleep(0.05)
        assert served.handler.disconnects == [(sid, "/ok", "server namespace disconnect",
                                               frozenset({"r"}))]
        assert not served.transport.has_members("/ok", "r")
        await ws.send("40/ok,")  # the session itself stays
        assert str(await recv(ws)).startswith('40/ok,{"sid":')


async def test_sio_disconnect_called_once_whatever_ends_it() -> None:
    """Handler.disconnect runs exactly once per connection, while it is still in its rooms,
    whether the client leaves, its socket goes away, the ping times out (on WebSocket during a
    handler call: the disconnect waits for the call to return; on polling), or the server
    closes the namespace; rooms are empty after."""
    async with serving(ping_interval=0.2, ping_timeout=0.1) as served, served.http() as http:
        handler, transport = served.handler, served.transport
        leaving, _ = await ws_connected(served, auth={"room": "r"})
        await leaving.send("41/ok,")
        going, _ = await ws_connected(served, auth={"room": "r"})
        await going.close()
        silent, _ = await ws_connected(served, auth={"room": "r"})
        await silent.send('42/ok,["slow",0.5]')  # answers no ping, and is busy past the deadline
        await poll_connected(http)  # answers no ping either
        transport.join(handler.conn(), "r")
        _kept, _ = await ws_connected(served, auth={"room": "r"})
        await handler.conn().close()
        await handler.wait(lambda: len(handler.disconnects) == 5, timeout=3)
        await asyncio.sleep(0.3)
        assert len(handler.disconnects) == 5
        reasons = sorted(reason for _, _, reason, _ in handler.disconnects)
        assert reasons == ["client namespace disconnect", "ping timeout", "ping timeout",
                           "server namespace disconnect", "transport close"], reasons
        assert {sid for sid, _, _, _ in handler.disconnects} == {conn.sid for conn, _ in handler.connects}
        assert all(rooms == frozenset({"r"}) for _, _, _, rooms in handler.disconnects)
        assert handler.order[-2:] == ["slow done", "disconnect ping timeout"]  # after the call
        assert not transport.has_members("/ok", "r")
        assert list(transport.connections()) == []


# --- writes --------------------------------------------------------------------------------


async def test_write_encodes_frame_once_and_reaches_every_member() -> None:
    """Transport.write: one Engine.IO message per Frame (frame.wire), the same to every member
    of the room, in order with what is emitted to each; returns the member count."""
    async with serving() as served, served.http() as http:
        sockets = [(await ws_connected(served, auth={"room": "r"}))[0] for _ in range(3)]
        poll = await poll_connected(http)
        served.transport.join(served.handler.conn(), "r")
        frame = Frame.event("/ok", "news", {"n": 1})
        assert served.transport.write("/ok", "r", frame) == 4
        wire = frame.wire
        served.handler.conn(0).emit("private", 2)
        assert served.transport.write("/ok", "r", frame) == 4
        assert frame.wire is wire
        assert served.transport.write("/ok", "nobody", frame) == 0
        assert served.transport.write("/nowhere", "r", frame) == 0
        assert await recv(sockets[0]) == '42/ok,["news",{"n":1}]'
        assert await recv(sockets[0]) == '42/ok,["private",2]'
        assert await recv(sockets[0]) == '42/ok,["news",{"n":1}]'
        for ws in sockets[1:]:
            assert [await recv(ws), await recv(ws)] == ['42/ok,["news",{"n":1}]'] * 2
        assert (await http.get(query(poll))).text == '42/ok,["news",{"n":1}]\x1e42/ok,["news",{"n":1}]'


async def test_join_leave_report_first_and_last_member() -> None:
    """join is True for a room's first member, leave True when it empties the room."""
    async with serving() as served:
        await ws_connected(served)
        await ws_connected(served)
        one, two = served.handler.conn(0), served.handler.conn(1)
        transport = served.transport
        assert transport.join(one, "r") is True
        assert transport.join(two, "r") is False
        assert transport.join(two, "r") is False
        assert one.rooms == frozenset({"r"}) and transport.has_members("/ok", "r")
        assert transport.leave(one, "r") is False
        assert transport.leave(two, "r") is True
        assert not transport.has_members("/ok", "r")


async def test_stalled_connection_queues_in_order_and_flush_waits() -> None:
    """A client that reads slowly: writes never wait, its frames queue (backlog) and reach it
    in order once it reads; flush() waits for them."""
    async with serving(max_backlog=0) as served:
        ws = await served.ws(max_queue=1, max_size=None)
        assert str(await recv(ws))[0] == "0"
        await ws.send('40/ok,{"room":"big"}')
        assert str(await recv(ws)).startswith("40/ok,")
        await asyncio.sleep(0.05)
        conn = served.handler.conn()
        count = 300
        started = time.monotonic()
        for i in range(count):
            served.transport.write("/ok", "big", Frame.event("/ok", "big", i, "x" * 65536))
        assert time.monotonic() - started < 1.0
        assert conn.backlog() > 0
        flushing = asyncio.create_task(served.transport.flush())
        received = [json.loads(str(await recv(ws, timeout=10))[6:])[1] for _ in range(count)]
        assert received == list(range(count))
        async with asyncio.timeout(3):
            await flushing
        assert conn.backlog() == 0


async def test_slow_consumer_cut_off_beyond_max_backlog(caplog: pytest.LogCaptureFixture) -> None:
    """Beyond max_backlog a connection is cut off: a warning with its sid, Handler.disconnect,
    its buffer freed, the counter raised; the others go on."""
    async with serving(max_backlog=50) as served:
        fast, _ = await ws_connected(served, auth={"room": "big"})
        slow = await served.ws(max_queue=1, max_size=None)
        assert str(await recv(slow))[0] == "0"
        await slow.send('40/ok,{"room":"big"}')
        assert str(await recv(slow)).startswith("40/ok,")
        await asyncio.sleep(0.05)
        slow_conn = served.handler.conn()
        slow_session = slow_conn.session  # type: ignore[attr-defined]
        reader = asyncio.create_task(_read_all(fast, 1000))
        with caplog.at_level(logging.WARNING, logger="echo.transport"):
            for i in range(1000):
                served.transport.write("/ok", "big", Frame.event("/ok", "big", i, "x" * 16384))
                await asyncio.sleep(0)
        assert len(await reader) == 1000
        await served.handler.wait(lambda: served.handler.disconnects)
        assert served.handler.disconnects[0][:3] == (slow_conn.sid, "/ok", "forced server close")
        assert any(slow_session.sid in record.getMessage() and "slow consumer" in record.getMessage()
                   for record in caplog.records)
        assert slow_conn.backlog() == 0 and served.transport.slow_consumers == 1
        assert served.transport.has_members("/ok", "big")


async def test_slow_consumer_cut_off_while_stalled_is_closed() -> None:
    """A client that never reads, cut off while flow control holds its writes (no close frame
    can reach it), does not stay: its session goes, the server's ASGI call returns within
    seconds (uvicorn closes the connection), and when it reads at last it finds the
    connection closed."""
    async with serving(max_backlog=20, ping_interval=60) as served:
        slow = await served.ws(max_queue=1, max_size=None)
        assert str(await recv(slow))[0] == "0"
        await slow.send('40/ok,{"room":"big"}')
        assert str(await recv(slow)).startswith("40/ok,")
        session = served.handler.conn().session  # type: ignore[attr-defined]
        assert len(served.websocket_calls) == 1
        for i in range(2000):
            if served.transport.slow_consumers:
                break
            served.transport.write("/ok", "big", Frame.event("/ok", "big", i, "x" * 16384))
            await asyncio.sleep(0)
        assert served.transport.slow_consumers == 1
        await served.handler.wait(lambda: not served.websocket_calls, timeout=5)
        assert served.handler.disconnects[0][2] == "forced server close"
        assert session.sid not in served.transport.sessions and session.reader is None
        assert await closed(slow, timeout=10) == 1006  # the TCP connection ended, no close frame


async def _read_all(ws: ClientConnection, count: int) -> list[str | bytes]:
    return [await recv(ws, timeout=10) for _ in range(count)]


# --- real clients --------------------------------------------------------------------------


@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"]],
                         ids=["websocket-only", "polling-then-upgrade"])
async def test_python_socketio_client(transports: list[str]) -> None:
    """python-socketio's AsyncClient: connect with auth, emit with ack, room writes, binary."""
    async with serving() as served:
        client = socketio.AsyncClient(reconnection=False)
        news: list[Any] = []
        got = asyncio.Event()

        async def on_news(data: Any) -> None:
            news.append(data)
            got.set()

        client.on("news", on_news, namespace="/ok")
        binary: list[Any] = []
        got_binary = asyncio.Event()

        async def on_echo(*args: Any) -> None:
            binary.append(args)
            got_binary.set()

        client.on("echo", on_echo, namespace="/ok")
        await client.connect(served.url, namespaces=["/ok"], auth={"token": "t"}, transports=transports,
                             wait_timeout=5)
        try:
            assert served.handler.connects[0][1] == {"token": "t"}
            assert await client.call("echo", {"a": 1}, namespace="/ok", timeout=3) == {"a": 1}
            await client.call("join", "room", namespace="/ok", timeout=3)
            if transports[0] == "polling":
                await served.handler.wait(lambda: served.handler.conn().transport_name == "websocket", 5)
            served.transport.write("/ok", "room", Frame.event("/ok", "news", {"n": 1}))
            async with asyncio.timeout(3):
                await got.wait()
            assert news == [{"n": 1}]
            assert await client.call("echo", b"\x00\xff", namespace="/ok", timeout=3) == b"\x00\xff"
            assert served.handler.events[-1][2] == [b"\x00\xff"]
            await client.emit("echo", {"blob": b"\x01\x02", "n": 3}, namespace="/ok")  # BINARY_EVENT back
            async with asyncio.timeout(3):
                await got_binary.wait()
            assert binary == [({"blob": b"\x01\x02", "n": 3},)]
            many = await asyncio.gather(*(client.call("echo", i, namespace="/ok", timeout=3)
                                          for i in range(40)))
            assert many == list(range(40))
        finally:
            await client.disconnect()
        await served.handler.wait(lambda: served.handler.disconnects)
        await asyncio.sleep(0.05)
        # python-socketio queues its DISCONNECT and closes the socket without waiting for it
        assert len(served.handler.disconnects) == 1
        assert served.handler.disconnects[0][2] in ("client namespace disconnect", "transport close")


NODE_CLIENT = Path(__file__).resolve().parent / "node" / "socketio-client.mjs"


@pytest.mark.node
@pytest.mark.parametrize("options", [{"transports": ["websocket"]}, {"transports": ["polling"]}, {}],
                         ids=["websocket-only", "polling-only", "polling-then-upgrade"])
async def test_node_socketio_client(options: dict[str, Any]) -> None:
    require_node_clients()
    """Node's socket.io-client: connect with auth, acked emits, a room write, and 20 emits in a
    row (over polling: one POST of 20 packets), echoed back in order."""
    async with serving() as served:
        steps = [
            {"op": "connect", "client": "a", "app": "ok", "jwt": "token", "options": options},
            {"op": "emit", "client": "a", "event": "echo", "args": [{"x": 1}], "ack": True, "label": "echo"},
            {"op": "emit", "client": "a", "event": "join", "args": ["room"], "ack": True, "label": "join"},
            {"op": "wait", "client": "a", "event": "news"},
            *({"op": "emit", "client": "a", "event": "echo", "args": [i]} for i in range(20)),
            {"op": "wait", "client": "a", "event": "echo", "count": 20},
        ]
        params = json.dumps({"url": served.url, "deadlineMs": 15000, "waitMs": 5000, "steps": steps})
        node = await asyncio.create_subprocess_exec("node", str(NODE_CLIENT), params,
                                                    stdout=asyncio.subprocess.PIPE)
        assert node.stdout is not None
        lines: list[dict[str, Any]] = []
        async with asyncio.timeout(20):
            async for raw in node.stdout:
                line = json.loads(raw)
                lines.append(line)
                if line["type"] == "ack" and line["label"] == "join":
                    served.transport.write("/ok", "room", Frame.event("/ok", "news", {"n": 1}))
            assert await node.wait() == 0, lines[-3:]
        acks = {line["label"]: line["data"] for line in lines if line["type"] == "ack"}
        assert acks == {"echo": {"x": 1}, "join": "room"}
        echoed = [line["data"] for line in lines if line["type"] == "event" and line["event"] == "echo"]
        assert echoed == list(range(20))
        assert served.handler.connects[0][1] == {"jwt": "token"}

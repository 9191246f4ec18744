"""The python-socketio transport under a real uvicorn, driven by python-socketio's own client.

A tiny core (:class:`Core`) stands in for Echo's: it records every call, answers acks (some
later, from another task), and, like Echo's core, sends an ``error``-style event instead when
the client asked for no ack. The last test reads the module's source: public API only.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio  # type: ignore[import-untyped]
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from echo.transport import pysocketio
from echo.transport.base import Connection, Frame, Refused, TransportOptions
from echo.transport.pysocketio import PySocketIOTransport
from echo.transport.websocket_protocol import EchoWebSocketProtocol
from tests.conftest import require_node_clients

pytestmark = pytest.mark.anyio  # every test but the Node one is also `unit`

NS = "/app"
TOKEN = "let-me-in"
# python-engineio holds a closed client's long-poll until ping interval + timeout (2 s here)
TRANSPORTS = ["websocket", pytest.param("polling", marks=pytest.mark.slow)]


class Core:
    """Stands in for Echo's core: records calls, answers a few events."""

    def __init__(self) -> None:
        self.transport: PySocketIOTransport
        self.connected: list[Connection] = []
        self.events: list[tuple[str, str, list[Any], int | None]] = []
        self.left: list[tuple[str, str, frozenset[str]]] = []
        self.busy = False
        self.overlaps = 0
        self.returned: dict[int, float] = {}
        self.acked: dict[int, float] = {}
        self.later: set[asyncio.Task[None]] = set()

    def conn(self, sid: str) -> Connection:
        return next(conn for conn in self.connected if conn.sid == sid)

    async def connect(self, conn: Connection, auth: Any) -> None:
        if not isinstance(auth, dict) or auth.get("token") != TOKEN:
            raise Refused("Authorization error: bad token", {"code": "unauthorized"})
        conn.state = auth.get("name")
        self.connected.append(conn)

    async def event(self, conn: Connection, event: str, args: list[Any], ack_id: int | None) -> None:
        if self.busy:
            self.overlaps += 1
        self.busy = True
        try:
            # a second call for this connection would start while this one waits
            await asyncio.sleep(0.002 if event == "seq" else 0)
            self.events.append((conn.sid, event, args, ack_id))
            await self.answer(conn, event, args, ack_id)
        finally:
            self.busy = False
        if ack_id is not None:
            self.returned[ack_id] = time.monotonic()

    async def answer(self, conn: Connection, event: str, args: list[Any], ack_id: int | None) -> None:
        if event == "later":
            task = asyncio.get_running_loop().create_task(self.ack_later(conn, ack_id, args))
            self.later.add(task)
            task.add_done_callback(self.later.discard)
            return
        if event == "bye":
            await conn.close()
            return
        if event == "join":
            reply: Any = self.transport.join(conn, args[0])
        elif event == "leave":
            reply = self.transport.leave(conn, args[0])
        elif event == "publish":
            reply = self.transport.write(conn.namespace, args[0], Frame.event(conn.namespace, "message",
                                                                             args[1]))
        else:
            reply = args
        if ack_id is None:
            conn.emit("noack", event)
        else:
            conn.ack(ack_id, reply)

    async def ack_later(self, conn: Connection, ack_id: int | None, args: list[Any]) -> None:
        await asyncio.sleep(0.05)
        assert ack_id is not None
        self.acked[ack_id] = time.monotonic()
        conn.ack(ack_id, {"late": args[0]})

    async def disconnect(self, conn: Connection, reason: str) -> None:
        self.left.append((conn.sid, reason, conn.rooms))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse("hello from the other app")


@contextlib.asynccontextmanager
async def serving(core: Core, **options: Any) -> AsyncIterator[tuple[PySocketIOTransport, str]]:
    """The transport with ``core`` under a real uvicorn on a free loopback port.

    Short pings: python-engineio answers a long-poll that is pending when its client closes
    only when the poll times out (ping interval + ping timeout), and the client waits for it.
    """
    options = {"ping_interval": 1.0, "ping_timeout": 1.0, **options}
    transport = PySocketIOTransport(core, TransportOptions(**options))
    core.transport = transport
    other = Starlette(routes=[Route("/hello", hello)])
    config = uvicorn.Config(transport.asgi(other), host="127.0.0.1", port=free_port(),
                            ws=EchoWebSocketProtocol, ws_per_message_deflate=False, lifespan="on",
                            log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    serve = asyncio.get_running_loop().create_task(server.serve())
    await until(lambda: server.started or serve.done())
    await transport.start()
    try:
        yield transport, f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await serve


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait for what a client or the core records (no event to wait on in either)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


class Client:
    """python-socketio's client on ``/app``, recording what it receives."""

    def __init__(self, url: str, transport: str) -> None:
        self.url = url
        self.transport = transport
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: list[tuple[str, tuple[Any, ...]]] = []
        self.errors: list[Any] = []
        self.disconnects: list[tuple[Any, ...]] = []
        self.sio.on("*", self.record, namespace=NS)
        self.sio.on("connect_error", self.errors.append, namespace=NS)
        self.sio.on("disconnect", self.gone, namespace=NS)

    def record(self, event: str, *args: Any) -> None:
        self.received.append((event, args))

    def gone(self, *reason: Any) -> None:
        self.disconnects.append(reason)

    def got(self, event: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.received if name == event]

    async def connect(self, token: str = TOKEN, name: str = "a") -> Client:
        await self.sio.connect(self.url, auth={"token": token, "name": name}, namespaces=[NS],
                               transports=[self.transport], wait_timeout=5)
        return self

    @property
    def sid(self) -> str:
        sid: str = self.sio.get_sid(NS)
        return sid

    async def call(self, event: str, *args: Any) -> Any:
        return await self.sio.call(event, args, namespace=NS, timeout=5)

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


@contextlib.asynccontextmanager
async def clients(url: str, *transports: str) -> AsyncIterator[list[Client]]:
    made = [Client(url, transport) for transport in transports]
    try:
        for index, client in enumerate(made):
            await client.connect(name=f"c{index}")
        yield made
    finally:
        await asyncio.gather(*(client.close() for client in made))


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_connect_passes_auth_and_other_paths_reach_the_other_app(kind: str) -> None:
    core = Core()
    async with serving(core) as (transport, url), clients(url, kind) as [client]:
        [conn] = core.connected
        assert conn.sid == client.sid
        assert conn.namespace == NS and conn.app == "app" and conn.state == "c0"
        assert conn.transport_name == kind
        assert list(transport.connections()) == [conn]
        async with httpx.AsyncClient() as http:
            response = await http.get(url + "/hello")
        assert response.text == "hello from the other app"


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_refusal_reaches_the_client_as_connect_error_with_its_message(kind: str) -> None:
    core = Core()
    async with serving(core) as (transport, url):
        client = Client(url, kind)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect(token="wrong")
        assert client.errors == [{"message": "Authorization error: bad token",
                                  "data": {"code": "unauthorized"}}]
        assert core.connected == [] and core.left == []
        assert list(transport.connections()) == [] and transport.registry == {}
        await client.close()


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_ack_answered_later_from_another_task_does_not_hold_up_the_connection(kind: str) -> None:
    core = Core()
    async with serving(core) as (_, url), clients(url, kind) as [client]:
        finished: list[str] = []

        async def call(event: str, value: Any) -> Any:
            reply = await client.call(event, value)
            finished.append(event)
            return reply

        later, now = await asyncio.gather(call("later", 7), call("echo", 8))
        assert later == {"late": 7} and now == [8]
        assert finished == ["echo", "later"]  # the late ack did not block the next event
        [(_, _, _, ack_id)] = [event for event in core.events if event[1] == "later"]
        assert ack_id is not None and core.acked[ack_id] > core.returned[ack_id]


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_an_event_without_ack_reaches_the_core_without_an_ack_id(kind: str) -> None:
    core = Core()
    async with serving(core) as (_, url), clients(url, kind) as [client]:
        await client.sio.emit("echo", {"x": 1}, namespace=NS)
        await until(lambda: client.got("noack"))
        assert client.got("noack") == [("echo",)]
        assert await client.call("echo", 2) == [2]
        assert [(event, args, ack_id is None) for _, event, args, ack_id in core.events] == [
            ("echo", [{"x": 1}], True), ("echo", [2], False)]


@pytest.mark.unit
async def test_room_writes_arrive_in_order_at_every_member_and_only_there() -> None:
    core = Core()
    async with serving(core) as (transport, url), \
            clients(url, "websocket", "websocket", "websocket") as [first, second, outsider]:
        assert await first.call("join", "room") is True
        assert await second.call("join", "room") is False
        assert transport.has_members(NS, "room") and not transport.has_members(NS, "other")
        conns = [core.conn(first.sid), core.conn(second.sid)]
        counts = {transport.write(NS, "room", Frame.event(NS, "message", {"i": i})) for i in range(500)}
        assert counts == {2}
        assert [conn.backlog() for conn in conns] == [500, 500]  # nothing written yet: never waits
        async with asyncio.timeout(5):
            await transport.flush()
        assert [conn.backlog() for conn in conns] == [0, 0]
        await until(lambda: len(first.got("message")) == 500 and len(second.got("message")) == 500)
        expected = [({"i": i},) for i in range(500)]
        assert first.got("message") == expected and second.got("message") == expected
        core.conn(outsider.sid).emit("marker")
        await until(lambda: outsider.got("marker"))
        assert outsider.got("message") == []


@pytest.mark.unit
@pytest.mark.slow
async def test_room_writes_arrive_in_order_over_long_polling() -> None:
    """Batches of 10: python-engineio's client refuses a poll response of more than 16 packets."""
    core = Core()
    async with serving(core) as (transport, url), clients(url, "polling") as [client]:
        assert await client.call("join", "room") is True
        for batch in range(0, 100, 10):
            for i in range(batch, batch + 10):
                assert transport.write(NS, "room", Frame.event(NS, "message", i)) == 1
            await until(lambda end=batch + 10: len(client.got("message")) == end)  # type: ignore[misc]
        assert client.got("message") == [(i,) for i in range(100)]


@pytest.mark.unit
async def test_a_room_named_like_a_sid_does_not_reach_that_connection() -> None:
    """python-socketio keeps a room per sid; a channel of the same name is another room."""
    core = Core()
    async with serving(core) as (transport, url), clients(url, "websocket", "websocket") as [victim, member]:
        assert await member.call("join", victim.sid) is True
        assert transport.write(NS, victim.sid, Frame.event(NS, "message", "for members")) == 1
        await until(lambda: member.got("message"))
        core.conn(victim.sid).emit("marker")
        await until(lambda: victim.got("marker"))
        assert victim.got("message") == [] and member.got("message") == [("for members",)]


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_writes_before_an_ack_arrive_before_it(kind: str) -> None:
    core = Core()
    async with serving(core) as (_, url), clients(url, kind) as [client]:
        assert await client.call("join", "room") is True
        assert await client.call("publish", "room", {"n": 1}) == 1
        assert client.got("message") == [({"n": 1},)]


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_emit_reaches_one_connection_with_every_argument(kind: str) -> None:
    core = Core()
    async with serving(core) as (_, url), clients(url, kind, kind) as [target, other]:
        core.conn(target.sid).emit("direct", 1, "two", None, {"x": [1]})
        core.conn(other.sid).emit("marker")
        await until(lambda: target.got("direct") and other.got("marker"))
        assert target.got("direct") == [(1, "two", None, {"x": [1]})]
        assert other.got("direct") == []


@pytest.mark.unit
async def test_leave_reports_the_room_emptied_and_stops_its_writes() -> None:
    core = Core()
    async with serving(core) as (transport, url), clients(url, "websocket", "websocket") as [one, two]:
        assert await one.call("join", "room") is True
        assert await one.call("join", "room") is False  # already in it
        assert await two.call("join", "room") is False
        assert await two.call("leave", "room") is False  # `one` is still in it
        assert core.conn(two.sid).rooms == frozenset()
        assert transport.write(NS, "room", Frame.event(NS, "message", "for one")) == 1
        assert await one.call("leave", "room") is True
        assert await one.call("leave", "room") is False
        assert not transport.has_members(NS, "room")
        assert transport.write(NS, "room", Frame.event(NS, "message", "for nobody")) == 0
        for client in (one, two):
            core.conn(client.sid).emit("marker")
        await until(lambda: one.got("marker") and two.got("marker"))
        assert one.got("message") == [("for one",)] and two.got("message") == []


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_client_disconnect_is_reported_once_while_still_in_its_rooms(kind: str) -> None:
    core = Core()
    async with serving(core) as (transport, url), clients(url, kind) as [client]:
        sid = client.sid
        assert await client.call("join", "room") is True
        await client.close()
        await until(lambda: core.left)
        await asyncio.sleep(0.2)
        [(left_sid, reason, rooms)] = core.left
        assert (left_sid, rooms) == (sid, frozenset({"room"}))
        assert reason in {"client disconnect", "transport close"}  # as python-socketio tells it
        assert not transport.has_members(NS, "room")
        assert list(transport.connections()) == [] and transport.registry == {}


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_server_side_close_sends_disconnect_after_what_was_written(kind: str) -> None:
    core = Core()
    async with serving(core) as (_, url), clients(url, kind) as [client]:
        sid = client.sid
        core.conn(sid).emit("last words")
        await client.sio.emit("bye", namespace=NS)
        await until(lambda: client.disconnects and core.left)
        assert client.got("last words") == [()]
        await asyncio.sleep(0.2)
        assert core.left == [(sid, "server disconnect", frozenset())]


@pytest.mark.unit
async def test_events_of_one_connection_reach_the_core_in_order_one_at_a_time() -> None:
    core = Core()
    async with serving(core) as (_, url), clients(url, "websocket") as [client]:
        for i in range(300):
            await client.sio.emit("seq", i, namespace=NS)
        assert await client.call("echo", "done") == ["done"]
        assert [args[0] for _, event, args, _ in core.events if event == "seq"] == list(range(300))
        assert core.overlaps == 0


@pytest.mark.unit
@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_binary_arguments_arrive_as_bytes_and_go_back_as_bytes(kind: str) -> None:
    core = Core()
    blob = bytes(range(256))
    async with serving(core) as (_, url), clients(url, kind) as [client]:
        reply = await client.call("echo", blob, {"nested": b"\x00\x01"})
        assert reply == [blob, {"nested": b"\x00\x01"}]
        [(_, _, args, _)] = core.events
        assert isinstance(args[0], bytes) and args == [blob, {"nested": b"\x00\x01"}]


@pytest.mark.unit
async def test_a_packet_with_too_many_attachments_is_dropped_and_the_connection_lives() -> None:
    core = Core()
    async with serving(core, max_attachments=2) as (_, url), clients(url, "websocket") as [client]:
        await client.sio.emit("echo", (b"\x00a", b"\x00b", b"\x00c"), namespace=NS)
        assert await client.call("echo", b"\x00a", b"\x00b") == [b"\x00a", b"\x00b"]
        assert [args for _, _, args, _ in core.events] == [[b"\x00a", b"\x00b"]]


@pytest.mark.unit
async def test_events_named_connect_or_disconnect_are_ordinary_events() -> None:
    core = Core()
    async with serving(core) as (transport, url), clients(url, "websocket") as [client]:
        assert await client.call("connect", 1) == [1]
        assert await client.call("disconnect", 2) == [2]
        assert [event for _, event, _, _ in core.events] == ["connect", "disconnect"]
        assert len(core.connected) == 1 and core.left == []
        assert len(list(transport.connections())) == 1


@pytest.mark.unit
async def test_close_ends_every_session_and_reports_each_connection_once() -> None:
    core = Core()
    async with serving(core) as (transport, url), clients(url, "websocket", "polling") as made:
        assert await made[0].call("join", "room") is True
        sids = sorted(client.sid for client in made)
        await transport.close()
        await until(lambda: all(client.disconnects for client in made))
        assert sorted(sid for sid, _, _ in core.left) == sids
        assert [reason for _, reason, _ in core.left] == ["transport close", "transport close"]
        assert list(transport.connections()) == [] and not transport.has_members(NS, "room")


@pytest.mark.unit
def test_the_module_uses_no_private_attribute_and_patches_nothing() -> None:
    source = Path(pysocketio.__file__).read_text()
    tree = ast.parse(source)
    private = [f"line {node.lineno}: .{node.attr}" for node in ast.walk(tree)
               if isinstance(node, ast.Attribute) and node.attr.startswith("_")
               and not (node.attr.startswith("__") and node.attr.endswith("__"))]
    assert private == []
    imported = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    patched = [f"line {node.lineno}" for node in ast.walk(tree)
               if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign)
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
               if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
               and target.value.id in imported]
    assert patched == []
    assert "setattr(" not in source


NODE_DIR = Path(__file__).resolve().parent / "node"

JS_CLIENT = """
import { io } from "socket.io-client";
const out = (line) => console.log(JSON.stringify(line));
const socket = io(process.env.URL + "/app", {
  auth: { token: process.env.TOKEN }, transports: JSON.parse(process.env.TRANSPORTS),
  reconnectionDelay: 50, reconnectionDelayMax: 100,
});
let connects = 0;
socket.on("noack", (event) => out({ event: "noack", of: event }));
socket.on("connect_error", (err) => { out({ event: "connect_error", message: err.message, data: err.data });
  process.exit(0); });
socket.on("disconnect", (reason) => out({ event: "disconnect", reason }));
socket.on("connect", async () => {
  connects += 1;
  out({ event: "connect", transport: socket.io.engine.transport.name });
  if (connects === 1) {
    out({ event: "ack", reply: await socket.emitWithAck("later", 7) });
    socket.emit("echo", 1);
  } else { socket.disconnect(); setTimeout(() => process.exit(0), 50); }
});
setTimeout(() => process.exit(3), 10000);
"""


async def run_js_client(url: str, token: str, transports: list[str],
                        on_line: Callable[[dict[str, Any]], Any]) -> list[dict[str, Any]]:
    """Run socket.io-client in Node; ``on_line`` sees each line it prints (and may await)."""
    import json
    import os

    env = {**os.environ, "URL": url, "TOKEN": token, "TRANSPORTS": json.dumps(transports)}
    process = await asyncio.create_subprocess_exec(
        "node", "--input-type=module", "-e", JS_CLIENT, cwd=NODE_DIR, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    lines: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        async for raw in process.stdout:
            line = json.loads(raw)
            lines.append(line)
            result = on_line(line)
            if asyncio.iscoroutine(result):
                await result
        assert await process.wait() == 0, await process.stderr.read() if process.stderr else b""
    return lines


@pytest.mark.node
@pytest.mark.parametrize("transports", [["websocket"], ["polling", "websocket"]])
async def test_socketio_js_client_acks_refusals_and_reconnects_after_close(transports: list[str]) -> None:
    """Node's socket.io-client: a late ack, an event without ack, a refusal's message, and a
    transport close by :meth:`close` that it reconnects from (python's client does not)."""
    require_node_clients()
    core = Core()
    async with serving(core) as (transport, url):
        refused = await run_js_client(url, "wrong", transports, lambda line: None)
        assert refused == [{"event": "connect_error", "message": "Authorization error: bad token",
                            "data": {"code": "unauthorized"}}]

        async def on_line(line: dict[str, Any]) -> None:
            if line.get("event") == "noack":
                await transport.close()

        lines = await run_js_client(url, TOKEN, transports, on_line)
        events = [line["event"] for line in lines]
        assert events == ["connect", "ack", "noack", "disconnect", "connect", "disconnect"]
        assert lines[1]["reply"] == {"late": 7} and lines[2]["of"] == "echo"
        assert lines[3]["reason"] == "transport close"  # so it reconnected by itself
        await until(lambda: len(core.left) == 2)
        assert [reason for _, reason, _ in core.left] == ["transport close", "client disconnect"]

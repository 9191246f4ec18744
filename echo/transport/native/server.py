"""Echo's own Socket.IO server: Engine.IO v4 + Socket.IO v5 on uvicorn's ASGI.

Serves ``/socket.io/`` (long-polling and WebSocket) and hands every other request, and the
lifespan, to the app it wraps. Keeps the rooms and writes a frame to a room's members the
cheap way: the Engine.IO message is built once per :class:`Frame` (``frame.wire``) and the
same dict goes to every member's socket, without a task, a queue or a frame build per
recipient (see :mod:`.session` for a member that reads too slowly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any

from starlette.types import ASGIApp

from echo.transport.base import Connection, Frame, Handler, Transport, TransportOptions
from echo.transport.native import packets, polling, websocket
from echo.transport.native.handshake import Cors, Receive, Scope, Send
from echo.transport.native.packets import Message
from echo.transport.native.session import TRANSPORT_CLOSE, EngineSession
from echo.transport.native.sockets import NativeConnection, Session, new_id
from echo.transport.websocket_protocol import EchoWebSocketProtocol

log = logging.getLogger("echo.transport")

PATH = "/socket.io"

CLOSE_WAIT = 10.0
"""Seconds :meth:`NativeTransport.close` waits for the disconnect handlers it started."""


class NativeTransport(Transport):
    """See the module docstring; ``NativeTransport(handler, options)``."""

    name = "native"

    def __init__(self, handler: Handler, options: TransportOptions) -> None:
        super().__init__(handler, options)
        self.sessions: dict[str, Session] = {}
        self.rooms: dict[str, dict[str, set[NativeConnection]]] = {}
        """namespace -> room -> its members on this node."""
        self.cors = Cors(options.cors_origins)
        self.closing = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.drains: set[asyncio.Task[None]] = set()
        """Tasks finishing the writes of connections flow control paused."""
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- ASGI ----------------------------------------------------------------------------

    def asgi(self, other: ASGIApp) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            kind = scope["type"]
            if (kind == "http" or kind == "websocket") and _is_ours(scope):
                try:
                    if kind == "http":
                        await polling.serve(self, scope, receive, send)
                    else:
                        await websocket.serve(self, scope, receive, send)
                except OSError:  # the client went away mid-answer (uvicorn's ClientDisconnected)
                    pass
                except Exception:
                    log.exception("serving %s %r failed", kind, scope.get("path", "")[:80])
            else:
                await other(scope, receive, send)

        return app

    # --- what sessions use ---------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def new_session(self, transport: str, send: Send | None = None,
                    direct: EchoWebSocketProtocol | None = None) -> Session:
        session = Session(self, new_id(), transport)
        self.sessions[session.sid] = session
        if send is not None:
            session.transport = "websocket"
            session.ws_send = send
            session.ws_direct = direct
            session.write(self.open_message(session.sid, []))
        session.start()
        return session

    def open_message(self, sid: str, upgrades: list[str]) -> Message:
        options = self.options
        return packets.open_message(sid, upgrades, options.ping_interval, options.ping_timeout,
                                    options.max_payload)

    def forget(self, session: EngineSession) -> None:
        if self.sessions.get(session.sid) is session:
            del self.sessions[session.sid]

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def drop_rooms(self, conn: NativeConnection) -> None:
        """Take ``conn`` out of every room it is still in."""
        for room in list(conn.room_names):
            self._remove(conn, room)

    # --- rooms ---------------------------------------------------------------------------

    def join(self, conn: Connection, room: str) -> bool:
        assert isinstance(conn, NativeConnection)
        rooms = self.rooms.setdefault(conn.namespace, {})
        members = rooms.get(room)
        if members is None:
            members = rooms[room] = set()
        elif conn in members:
            return False
        members.add(conn)
        conn.room_names.add(room)
        return len(members) == 1

    def leave(self, conn: Connection, room: str) -> bool:
        assert isinstance(conn, NativeConnection)
        return self._remove(conn, room)

    def _remove(self, conn: NativeConnection, room: str) -> bool:
        if room not in conn.room_names:
            return False
        conn.room_names.discard(room)
        rooms = self.rooms.get(conn.namespace)
        members = rooms.get(room) if rooms is not None else None
        if rooms is None or members is None:
            return False
        members.discard(conn)
        if members:
            return False
        del rooms[room]
        if not rooms:
            del self.rooms[conn.namespace]
        return True

    def write(self, namespace: str, room: str, frame: Frame) -> int:
        rooms = self.rooms.get(namespace)
        if rooms is None:
            return 0
        members = rooms.get(room)
        if not members:
            return 0
        wire = frame.wire
        if wire is None:
            wire = frame.wire = packets.text_message("4" + frame.text)
        for conn in members:
            conn.writer(wire)
        return len(members)

    def has_members(self, namespace: str, room: str) -> bool:
        rooms = self.rooms.get(namespace)
        return rooms is not None and bool(rooms.get(room))

    def connections(self) -> Iterable[Connection]:
        return [conn for session in list(self.sessions.values()) for conn in session.namespaces.values()]

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def flush(self) -> None:
        """Until the paused sockets have taken what was written and polling clients have
        fetched theirs (the caller bounds the wait)."""
        while True:
            polling_waits = any(session.buffer and session.ws_send is None
                                for session in self.sessions.values())
            if self.drains and not polling_waits:
                await asyncio.wait(set(self.drains))
            elif polling_waits:
                await asyncio.sleep(0.05)
            else:
                return

    async def close(self) -> None:
        """Every session ends as a transport close; new ones are refused from now on."""
        self.closing = True
        for session in list(self.sessions.values()):
            session.close(TRANSPORT_CLOSE, code=1001, notify=True)
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=CLOSE_WAIT)
            if late:
                log.warning("%d disconnect handlers still running after %.0f s", len(late), CLOSE_WAIT)


def _is_ours(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == PATH or path == PATH + "/"

"""The Socket.IO v5 side of a session: namespace connections, events, acks, binary packets.

Packets are handled where they are read, one at a time, each handler call awaited before the
next packet (no task per packet), so a connection's events reach the core in the order they
were sent and its handler calls never overlap. ``Handler.disconnect`` runs exactly once per
accepted connection, whatever ends it; if the session ends while a handler call for it is
still running, the disconnect waits for that call to return.

A handler call that raises is logged (bounded: the exception may quote what the client sent)
and, for an event that asked for an ack, the ack is answered with an error body, so the
client's callback does not wait for nothing.
"""

from __future__ import annotations

import logging
import secrets
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from echo.transport.base import Connection, Frame, Refused
from echo.transport.native import packets
from echo.transport.native.packets import Message, Packet, PacketError
from echo.transport.native.session import (
    CLIENT_NAMESPACE_DISCONNECT,
    FORCED_SERVER_CLOSE,
    SERVER_NAMESPACE_DISCONNECT,
    EngineSession,
)

if TYPE_CHECKING:
    from echo.transport.native.server import NativeTransport

log = logging.getLogger("echo.transport")


def new_id() -> str:
    """A random, unguessable id (120 bits), never reused."""
    return secrets.token_urlsafe(15)


INTERNAL_ERROR: Final = {"ok": False, "error": {"code": "internal", "message": "Internal server error"}}
"""The ack of an event whose handler raised (the shape of the core's error bodies)."""


def failure(exc: BaseException) -> str:
    """``exc`` for the log, bounded: its type, its message cut short, where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " < ".join(f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
                       for frame in reversed(frames))
    return f"{type(exc).__name__}({str(exc)[:200]!r}) at {where}"


def _discard(message: Message) -> None:
    """The writer of a connection that has left: what is still addressed to it goes nowhere."""


class NativeConnection(Connection):
    """One namespace connection of a session.

    ``writer`` is what room writes call for this connection: the session's ``write`` once the
    client has its CONNECT answer, a holding list before that (so nothing overtakes the
    answer), nothing once it has left.
    """

    __slots__ = ("early", "namespace", "room_names", "session", "sid", "state", "writer")

    def __init__(self, session: Session, namespace: str) -> None:
        self.sid = new_id()
        self.namespace = namespace
        self.state: Any = None
        self.session = session
        self.room_names: set[str] = set()
        self.early: list[Message] | None = []
        self.writer: Callable[[Message], None] = self._hold

    def _hold(self, message: Message) -> None:
        early = self.early
        if early is not None:
            early.append(message)
            limit = self.session.server.options.max_backlog
            if limit and len(early) > limit:
                self.session.close(FORCED_SERVER_CLOSE)

    def go_live(self) -> None:
        """From now on writes go straight to the session (what was held first, in order)."""
        early = self.early
        if early is None:  # it left in the meantime
            return
        self.early = None
        self.writer = self.session.write
        self.session.write_all(early)

    def mute(self) -> None:
        self.early = None
        self.writer = _discard

    @property
    def connected(self) -> bool:
        return self.session.namespaces.get(self.namespace) is self

    @property
    def transport_name(self) -> str:
        return self.session.transport

    @property
    def rooms(self) -> frozenset[str]:
        return frozenset(self.room_names)

    def emit(self, event: str, *args: Any) -> None:
        for message in packets.encode(packets.EVENT, self.namespace, [event, *args]):
            self.writer(message)

    def write(self, frame: Frame) -> None:
        wire = frame.wire
        if wire is None:
            wire = frame.wire = packets.text_message("4" + frame.text)
        self.writer(wire)

    def ack(self, ack_id: int, *args: Any) -> None:
        for message in packets.encode(packets.ACK, self.namespace, list(args), ack_id):
            self.writer(message)

    def backlog(self) -> int:
        return self.session.backlog() + len(self.early or ())

    def throttle(self, seconds: float) -> None:
        self.session.hold(seconds)

    async def close(self) -> None:
        session = self.session
        if not self.connected:
            return
        del session.namespaces[self.namespace]
        session.write_all(packets.encode_disconnect(self.namespace))
        self.mute()
        if session.active is self:  # called from its own handler call: run after it returns
            session.defer(self, SERVER_NAMESPACE_DISCONNECT)
        else:
            await session.disconnected(self, SERVER_NAMESPACE_DISCONNECT)

    def __repr__(self) -> str:
        return f"NativeConnection({self.namespace!r}, sid={self.sid!r})"


class Session(EngineSession):
    """An Engine.IO session carrying Socket.IO: the namespaces its client connected."""

    __slots__ = ("active", "connect_timer", "deferred", "namespaces", "partial", "parts", "parts_size",
                 "saw_connect")

    def __init__(self, server: NativeTransport, sid: str, transport: str) -> None:
        super().__init__(server, sid, transport)
        self.namespaces: dict[str, NativeConnection] = {}
        self.saw_connect = False
        self.active: NativeConnection | None = None
        """The connection whose handler call is running now."""
        self.deferred: list[tuple[NativeConnection, str]] | None = None
        self.partial: Packet | None = None
        """A binary packet waiting for its attachments."""
        self.parts: list[bytes] = []
        self.parts_size = 0
        self.connect_timer: Any = None

    def start(self) -> None:
        super().start()
        self.connect_timer = self.server.loop.call_later(
            self.server.options.connect_timeout, self._connect_timeout)

    def _connect_timeout(self) -> None:
        self.connect_timer = None
        if not self.namespaces and not self.closed:
            log.info("session %s: no namespace connected within %.3g s, closing", self.sid,
                     self.server.options.connect_timeout)
            self.close("connect timeout")

    # --- incoming ------------------------------------------------------------------------

    async def on_message(self, text: str) -> None:
        if self.partial is not None:
            self.invalid("text while a binary packet waits for its attachments", text)
            return
        try:
            packet = packets.decode(text, self.server.options.max_attachments)
        except PacketError as exc:
            self.invalid(str(exc), text)
            return
        if packet.attachments:
            self.partial = packet
            return
        if packet.kind == packets.BINARY_EVENT or packet.kind == packets.BINARY_ACK:
            if not self._fill(packet, []):
                return
        await self._dispatch(packet)

    async def on_binary(self, data: bytes) -> None:
        packet = self.partial
        if packet is None:
            self.invalid("binary data outside a binary packet", data)
            return
        self.parts.append(data)
        self.parts_size += len(data)
        if self.parts_size > self.server.options.max_payload:
            self.invalid("binary attachments larger than maxPayload", data)
            return
        if len(self.parts) < packet.attachments:
            return
        parts, self.parts, self.parts_size, self.partial = self.parts, [], 0, None
        if self._fill(packet, parts):
            await self._dispatch(packet)

    def _fill(self, packet: Packet, parts: list[bytes]) -> bool:
        try:
            packet.data = packets.fill_placeholders(packet.data, parts)
        except PacketError as exc:
            self.invalid(str(exc), repr(packet.data)[:80])
            return False
        return True

    async def _dispatch(self, packet: Packet) -> None:
        kind = packet.kind
        if kind == packets.CONNECT:
            await self._connect(packet)
            return
        if not self.saw_connect:  # "If the server does not receive a CONNECT packet first ..."
            self.invalid("first Socket.IO packet is not CONNECT", str(kind))
            return
        conn = self.namespaces.get(packet.namespace)
        if conn is None:
            log.debug("session %s: packet for namespace %r it is not connected to, ignored",
                      self.sid, packet.namespace[:80])
            return
        if kind == packets.EVENT or kind == packets.BINARY_EVENT:
            data = packet.data
            self.active = conn
            try:
                await self.server.handler.event(conn, data[0], data[1:], packet.ack_id)
            except Exception as exc:
                log.error("handler.event failed for %s event %r: %s", conn.sid, data[0][:80], failure(exc))
                if packet.ack_id is not None:
                    conn.ack(packet.ack_id, INTERNAL_ERROR)
            finally:
                self.active = None
            if self.deferred:
                await self.run_deferred()
        elif kind == packets.DISCONNECT:
            del self.namespaces[conn.namespace]
            conn.mute()
            await self.disconnected(conn, CLIENT_NAMESPACE_DISCONNECT)
        # ACK / BINARY_ACK: the server asks for no acks; CONNECT_ERROR is the server's to send

    async def _connect(self, packet: Packet) -> None:
        self.saw_connect = True
        namespace = packet.namespace
        if namespace in self.namespaces:
            log.debug("session %s: second CONNECT to %r ignored", self.sid, namespace[:80])
            return
        limit = self.server.options.max_namespaces
        if len(self.namespaces) >= limit:  # one socket must not hold many apps' slots
            self.write_all(packets.encode(packets.CONNECT_ERROR, namespace, {
                "message": f"this connection is in {limit} namespaces already (the limit)"}))
            return
        conn = NativeConnection(self, namespace)
        error: dict[str, Any] | None = None
        self.active = conn
        try:
            await self.server.handler.connect(conn, packet.data)
        except Refused as refused:
            error = {"message": refused.message}
            if refused.data is not None:
                error["data"] = refused.data
        except Exception as exc:
            log.error("handler.connect failed for namespace %r: %s", namespace[:80], failure(exc))
            error = {"message": "Internal server error"}
        finally:
            self.active = None
        if error is not None:
            conn.mute()
            self.server.drop_rooms(conn)
            try:
                answer = packets.encode(packets.CONNECT_ERROR, namespace, error)
            except TypeError:  # Refused.data JSON cannot hold
                answer = packets.encode(packets.CONNECT_ERROR, namespace, {"message": error["message"]})
            self.write_all(answer)
        elif self.closed:  # accepted, but the session ended meanwhile
            conn.mute()
            await self.disconnected(conn, self.close_reason)
        else:
            self.namespaces[namespace] = conn
            if self.connect_timer is not None:
                self.connect_timer.cancel()
                self.connect_timer = None
            self.write_all(packets.encode(packets.CONNECT, namespace, {"sid": conn.sid}))
            conn.go_live()
        if self.deferred:
            await self.run_deferred()

    # --- disconnects ---------------------------------------------------------------------

    def defer(self, conn: NativeConnection, reason: str) -> None:
        if self.deferred is None:
            self.deferred = []
        self.deferred.append((conn, reason))

    async def run_deferred(self) -> None:
        while self.deferred:
            conn, reason = self.deferred.pop(0)
            await self.disconnected(conn, reason)
        self.deferred = None

    async def disconnected(self, conn: NativeConnection, reason: str) -> None:
        """Tell the core ``conn`` is gone (it is still in its rooms), then empty its rooms."""
        try:
            await self.server.handler.disconnect(conn, reason)
        except Exception as exc:
            log.error("handler.disconnect failed for %s: %s", conn.sid, failure(exc))
        finally:
            self.server.drop_rooms(conn)

    async def _disconnect_all(self, conns: list[NativeConnection], reason: str) -> None:
        for conn in conns:
            await self.disconnected(conn, reason)

    def on_close(self, reason: str) -> None:
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        self.partial, self.parts = None, []
        conns = list(self.namespaces.values())
        self.namespaces.clear()
        for conn in conns:
            conn.mute()
        if not conns:
            return
        if self.active is not None:  # a handler call is running: disconnects follow it
            for conn in conns:
                self.defer(conn, reason)
        else:
            self.server.spawn(self._disconnect_all(conns, reason))

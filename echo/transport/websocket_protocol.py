"""Echo's WebSocket server under uvicorn: the ASGI WebSocket interface, plus direct frame writes.

uvicorn takes the class of the protocol that serves an upgraded connection (its ``ws``
setting). This one speaks the ASGI WebSocket interface like uvicorn's own, on websockets'
sans-I/O :class:`~websockets.server.ServerProtocol` (handshake, frame parsing, size limit,
ping and close replies), so any ASGI app runs on it, python-socketio included.

Why Echo has its own: a message to a room goes to every subscriber, and the ASGI ``send()``
costs a coroutine, a dict walk and a frame encoding per recipient (4.6 to 5.2 µs here, most of
a delivery). A server-to-client frame is never masked, so the same bytes are right for every
recipient: :meth:`EchoWebSocketProtocol.write` encodes a message once (the frame is kept in
the message itself) and hands those bytes to each connection. An app finds it through the
ASGI extension :data:`EXTENSION` in the scope and can fall back to ``send()`` under any
other server.

Frames are gathered per connection during one pass of the event loop and written at its end
(:class:`WriteBatch`): the ``write()`` system call is most of a delivery's cost, and a busy
channel sends one subscriber several messages per pass. Everything a connection sends goes
through the same gathering, so its order is the order it was written in.

What it leaves out, since Echo never asks for them: per-message deflate (measured at 0.34 of the
throughput) and WebSocket-level keepalive pings (Engine.IO has its own heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final, cast
from urllib.parse import unquote

from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

log = logging.getLogger("echo.transport")
protocol_log = logging.getLogger("echo.transport.websocket")
"""websockets' own log: a line per connection opened and closed at INFO, so quiet by default."""
protocol_log.setLevel(logging.WARNING)

EXTENSION: Final = "echo.websocket"
"""The scope extension naming the connection's :class:`EchoWebSocketProtocol`
(``scope["extensions"][EXTENSION]["connection"]``)."""

FRAME: Final = "echo.frame"
"""Where :meth:`EchoWebSocketProtocol.write` keeps a message's encoded frame, in the message."""

CLOSE_TIMEOUT: Final = 10.0
"""Seconds after our close frame before the TCP connection is closed without the reply."""

READ_QUEUE: Final = 16
"""Messages read ahead of the app before the socket stops being read (flow control)."""

GATHER_LIMIT: Final = 16384
"""Bytes gathered for one connection before they are written without waiting for the end of
the pass: flow control (``pause_writing``) sees a burst as it happens, as with plain writes."""

Message = MutableMapping[str, Any]


class ClientDisconnected(OSError):
    """A send on a connection that is closed or closing (ASGI: the app should stop)."""


def encode_frame(message: Message) -> bytes:
    """One unmasked, unfragmented text or binary frame for a ``websocket.send`` message."""
    text = message.get("text")
    payload: bytes
    if text is not None:
        payload = str(text).encode()
        first = 0x81  # FIN + text
    else:
        payload = bytes(message.get("bytes") or b"")
        first = 0x82  # FIN + binary
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


class WriteBatch:
    """The connections written to during this pass of the event loop, flushed at its end.

    The flush is scheduled with ``call_soon`` by the first write of a pass, so a frame waits
    at most for the callbacks already queued; then each connection gets one ``write()``.
    """

    __slots__ = ("loop", "pending", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[EchoWebSocketProtocol] = []
        self.scheduled = False

    def add(self, connection: EchoWebSocketProtocol) -> None:
        self.pending.append(connection)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        pending, self.pending, self.scheduled = self.pending, [], False
        for connection in pending:
            connection.write_gathered()


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch] = weakref.WeakKeyDictionary()


def batch_for(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    batch = _batches.get(loop)
    if batch is None:
        batch = _batches[loop] = WriteBatch(loop)
    return batch


class EchoWebSocketProtocol(asyncio.Protocol):
    """One upgraded connection: uvicorn hands it the transport and the request's bytes."""

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        # uvicorn's convention for ``ws`` protocol classes: these three keyword arguments
        if not config.loaded:
            config.load()
        self.app: Callable[..., Awaitable[None]] = config.loaded_app
        self.root_path: str = config.root_path
        self.connections: set[Any] = server_state.connections
        self.tasks: set[asyncio.Task[None]] = server_state.tasks
        self.default_headers: list[tuple[bytes, bytes]] = server_state.default_headers
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.conn = ServerProtocol(max_size=config.ws_max_size, logger=protocol_log)
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.incoming: deque[dict[str, Any]] = deque()
        self.reader: asyncio.Future[None] | None = None
        self.read_paused = False
        self.write_paused = False
        self.writable_waiter: asyncio.Future[None] | None = None
        self.fragments: list[bytes] = []
        self.fragment_is_text = False
        self.accepted = False
        self.close_sent = False
        self.disconnected = False
        """The app has been (or is about to be) told ``websocket.disconnect``."""
        self.lost = False
        self.close_timer: asyncio.TimerHandle | None = None
        self.batch = batch_for(self.loop)
        self.gathered: bytes | list[bytes] | None = None
        """Frames written during this pass of the loop, not yet given to the transport."""
        self.gathered_size = 0

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        for event in self.conn.events_received():
            if isinstance(event, Request):
                self._handshake(event)
            elif isinstance(event, Frame):
                self._frame(event)
        self._flush()
        if self.conn.parser_exc is not None or self.conn.handshake_exc is not None:
            self._failed()

    def eof_received(self) -> bool | None:
        self.conn.receive_eof()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.connections.discard(self)
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self._tell_app_disconnected(1006 if self.accepted and not self.close_sent else 1005)
        self._wake_writer()
        _drop_tracebacks(self.conn.parser_exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    def shutdown(self) -> None:
        """uvicorn is stopping: close what is still open (going away, 1012 as uvicorn does)."""
        if self.transport is None or self.lost:
            return
        if not self.accepted and not self.close_sent:
            self._reject(503, "The server is shutting down.\n")
            return
        if self.write_paused:  # it does not read: a close frame would never get out
            self.transport.abort()
            return
        if not self.close_sent:
            self._tell_app_disconnected(1012)
            self._send_close(1012, "")
        self.transport.close()

    # --- what the client sent ------------------------------------------------------------

    def _handshake(self, request: Request) -> None:
        response = self.conn.accept(request)
        if response.status_code != 101:  # not a valid WebSocket handshake: websockets says why
            self.close_sent = True
            self.conn.send_response(response)
            self._flush()
            assert self.transport is not None
            self.transport.close()
            return
        self.response = response
        assert self.transport is not None
        path, _, query = request.path.partition("?")
        protocols = [token.strip() for value in request.headers.get_all("Sec-WebSocket-Protocol")
                     for token in value.split(",") if token.strip()]
        scope = {
            "type": "websocket",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "wss" if self.transport.get_extra_info("sslcontext") else "ws",
            "server": _address(self.transport.get_extra_info("sockname")),
            "client": _address(self.transport.get_extra_info("peername")),
            "root_path": self.root_path,
            "path": self.root_path + unquote(path),
            "raw_path": (self.root_path + path).encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": [(name.lower().encode("latin-1"), value.encode("latin-1", "surrogateescape"))
                        for name, value in request.headers.raw_items()],
            "subprotocols": protocols,
            "state": self.app_state.copy(),
            "extensions": {EXTENSION: {"connection": self}},
        }
        self._queue({"type": "websocket.connect"})
        task = self.loop.create_task(self._run(scope))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self.fragment_is_text = opcode is Opcode.TEXT
            self.fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self.fragments.append(bytes(frame.data))
        elif opcode is Opcode.CLOSE:
            self._closed_by_client()
            return
        else:  # PING (websockets queued the PONG) or PONG
            return
        if not frame.fin:
            return
        data = self.fragments[0] if len(self.fragments) == 1 else b"".join(self.fragments)
        self.fragments = []
        if self.close_sent:
            return  # the app closed: nothing more for it, but read on until the client's reply
        if self.fragment_is_text:
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.conn.fail(1007, "invalid UTF-8")
                self._failed()
                return
            self._queue({"type": "websocket.receive", "text": text})
        else:
            self._queue({"type": "websocket.receive", "bytes": data})

    def _closed_by_client(self) -> None:
        received = self.conn.close_rcvd
        code = received.code if received is not None else 1005
        reason = received.reason if received is not None else ""
        if not self.close_sent:
            self._tell_app_disconnected(code, reason)
        self.close_sent = True
        self._flush()  # websockets queued the close reply (or the end of our handshake)
        if self.transport is not None:
            self.transport.close()

    def _failed(self) -> None:
        """A protocol error, an oversize message or bad UTF-8: websockets queued the close."""
        sent = self.conn.close_sent
        self._tell_app_disconnected(sent.code if sent is not None else 1002,
                                    sent.reason if sent is not None else "")
        self.close_sent = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _queue(self, message: dict[str, Any]) -> None:
        self.incoming.append(message)
        reader = self.reader
        if reader is not None:
            self.reader = None
            if not reader.done():
                reader.set_result(None)
        if not self.read_paused and len(self.incoming) >= READ_QUEUE and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _tell_app_disconnected(self, code: int, reason: str = "") -> None:
        if not self.disconnected:
            self.disconnected = True
            self._queue({"type": "websocket.disconnect", "code": code, "reason": reason})

    # --- ASGI ----------------------------------------------------------------------------

    async def _run(self, scope: dict[str, Any]) -> None:
        try:
            await self.app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except Exception:
            log.exception("the ASGI app failed on a WebSocket")
            self._end_after_app(1011)
        else:
            self._end_after_app(1000)

    def _end_after_app(self, code: int) -> None:
        """The app returned: refuse a handshake it never answered; close an open socket."""
        if self.lost or self.transport is None:
            return
        if self.write_paused:  # a client that does not read: no close frame would get out
            self.transport.abort()
            return
        if not self.accepted and not self.close_sent:
            self._reject(500, "Internal Server Error\n")
        elif not self.close_sent:
            self._send_close(code, "")
        elif self.close_timer is None and not self.transport.is_closing():
            self.transport.close()

    async def receive(self) -> dict[str, Any]:
        while not self.incoming:
            if self.disconnected:  # told already (and taken): say it again, never hang
                return {"type": "websocket.disconnect", "code": 1006, "reason": ""}
            self.reader = self.loop.create_future()
            await self.reader
        message = self.incoming.popleft()
        if self.read_paused and len(self.incoming) < READ_QUEUE // 2 and not self.lost:
            self.read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            while not self.write(message):
                await self.writable()
        elif kind == "websocket.accept":
            self._accept(message)
        elif kind == "websocket.close":
            if self.lost or self.close_sent:
                raise ClientDisconnected("the WebSocket is already closed")
            if not self.accepted:
                self._reject(403, "Forbidden\n")
            else:
                self._send_close(int(message.get("code") or 1000), str(message.get("reason") or ""))
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    def _accept(self, message: Message) -> None:
        if self.accepted or self.close_sent or self.response is None:
            raise RuntimeError("websocket.accept after the handshake was answered")
        if self.lost:
            raise ClientDisconnected("the client went away before the handshake was answered")
        response = self.response
        _add_default_headers(response, self.default_headers)
        subprotocol = message.get("subprotocol")
        if subprotocol:
            response.headers["Sec-WebSocket-Protocol"] = subprotocol
        for name, value in message.get("headers") or ():
            response.headers[bytes(name).decode("latin-1")] = bytes(value).decode("latin-1")
        self.conn.send_response(response)
        self.accepted = True
        self.response = None  # sent: its headers (a dict and a list per header) would stay
        self._flush()

    def _reject(self, status: int, text: str) -> None:
        self.close_sent = True
        self._tell_app_disconnected(1006)
        response = self.conn.reject(status, text)
        _add_default_headers(response, self.default_headers)
        try:
            self.conn.send_response(response)
        except InvalidState:  # already answered
            pass
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _send_close(self, code: int, reason: str) -> None:
        self.close_sent = True
        try:
            self.conn.send_close(code, reason)
        except InvalidState:  # the client's close came first: its reply is already queued
            pass
        self._flush()
        if self.conn.state is State.CLOSED or self.transport is None:
            return
        self.close_timer = self.loop.call_later(CLOSE_TIMEOUT, self._close_transport)

    def _close_transport(self) -> None:
        """No close reply in time: drop the connection, with whatever it has not read."""
        self.close_timer = None
        if self.transport is not None:
            self.transport.abort()

    # --- the direct write ----------------------------------------------------------------

    def write(self, message: Message) -> bool:
        """Write ``message``'s frame now: False while flow control pauses this connection.

        The frame is encoded at most once per message, whoever it goes to (kept under
        :data:`FRAME` in the message). Raises :class:`ClientDisconnected` once closed.
        """
        if self.write_paused:
            if self.lost:
                raise ClientDisconnected("the client went away")
            return False
        if self.close_sent or self.lost or not self.accepted:
            raise ClientDisconnected("the WebSocket is closed" if self.accepted else "not accepted")
        frame = message.get(FRAME)
        if frame is None:
            frame = message[FRAME] = encode_frame(message)
        gathered = self.gathered
        if gathered is None:  # the first this pass: one frame, no list (most recipients)
            self.gathered = frame
            self.gathered_size = len(frame)
            self.batch.add(self)
        else:
            if type(gathered) is bytes:
                self.gathered = [gathered, frame]
            else:
                gathered.append(frame)  # type: ignore[union-attr]
            self.gathered_size += len(frame)
        if self.gathered_size >= GATHER_LIMIT:
            # enough to be worth a write of its own, and flow control must see it now
            self.write_gathered()
        return True

    def write_gathered(self) -> None:
        """Give the transport what this pass gathered, in one write."""
        gathered, self.gathered = self.gathered, None
        transport = self.transport
        if gathered is None or transport is None or transport.is_closing():
            return
        transport.write(gathered if isinstance(gathered, bytes) else b"".join(gathered))

    async def writable(self) -> None:
        """Until this connection takes writes again (or is gone: then :meth:`write` raises)."""
        if not self.write_paused or self.lost:
            return
        if self.writable_waiter is None:
            self.writable_waiter = self.loop.create_future()
        await asyncio.shield(self.writable_waiter)

    def _wake_writer(self) -> None:
        waiter, self.writable_waiter = self.writable_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _flush(self) -> None:
        """Write what websockets queued (handshake, pong, close), after the gathered frames."""
        transport = self.transport
        if transport is None:
            return
        if self.gathered is not None:
            self.write_gathered()
        for data in self.conn.data_to_send():
            if data:
                transport.write(data)
            elif not transport.is_closing():  # websockets' end of stream: we are done writing
                transport.close()


def _drop_tracebacks(exc: BaseException | None) -> None:
    """A stream that ended mid-frame leaves websockets' ``parser_exc`` holding a traceback
    whose frame holds the protocol: a cycle only the garbage collector could free. The
    connection is over; the exception's message is all anyone reads."""
    seen = 0
    while exc is not None and seen < 8:
        exc.__traceback__ = None
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def _add_default_headers(response: Response, headers: list[tuple[bytes, bytes]]) -> None:
    """uvicorn's ``server`` (and any configured) headers; websockets already sets ``Date``."""
    for name, value in headers:
        key = name.decode("latin-1")
        if key not in response.headers:
            response.headers[key] = value.decode("latin-1")


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None

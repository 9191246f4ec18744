"""Fast broadcast: one WebSocket frame built per message, written to every subscriber.

python-socketio delivers a room emit by creating a task per recipient, each putting the
packet on the recipient's engine.io queue, whose writer task then builds a WebSocket frame
and hands it to uvicorn. At 1,000 subscribers that machinery is most of the server's time
(shared/notes/performance.md). Here, a message is encoded once, framed once, and the same
bytes are written to each subscriber's transport, with no task, queue or frame build per
recipient.

The direct write is taken only when it cannot change what a client sees:

* the connection is a plain WebSocket on uvicorn's sans-I/O protocol, open, with no
  extension (Echo turns per-message deflate off), and its transport is not paused by flow
  control (a slow reader keeps going through the queue, where the slow-consumer watchdog
  sees it);
* nothing is waiting in or leaving engine.io's queue for that socket: every packet that
  takes the queued path is counted until the writer has sent it, so a direct write never
  overtakes an earlier packet, and order on the wire is exactly the order of sends.

Anything else (long-polling, binary data, acks with callbacks) takes python-socketio's own
path. Connections that take the direct path also run Echo's own session loop
(:mod:`echo.core.session`) instead of engine.io's, which spent a task per packet read.

This couples to engine.io's socket internals (``queue``, ``upgraded``) and to uvicorn's
protocol (``transport``, ``writable``); the versions are pinned in pyproject.toml and the
behaviour is covered by every delivery test, which run with it on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import socketio
from engineio import packet as eio_packet

from echo.core import codec, metrics, session

log = logging.getLogger("echo.broadcast")

try:  # the only transport implementation the direct write understands
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - uvicorn without websockets
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]


def websocket_text_frame(payload: bytes) -> bytes:
    """An unmasked, final, text frame (RFC 6455 §5.2): what a server sends."""
    length = len(payload)
    if length < 126:
        header = bytes((0x81, length))
    elif length < 65536:
        header = bytes((0x81, 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + length.to_bytes(8, "big")
    return header + payload


def _protocol_of(asgi_send: Any) -> Any:
    protocol = getattr(asgi_send, "__self__", None)
    if WebSocketsSansIOProtocol is not None and isinstance(protocol, WebSocketsSansIOProtocol):
        return protocol
    return None


def _transport(sock: Any) -> Any:
    """The asyncio transport to write to directly, or None if a direct write is not safe.

    On the hot path for every recipient, so it reads plain attributes only; what cannot
    change after the handshake (protocol class, extensions) was checked when tracking began.
    """
    protocol = sock.__dict__.get("echo_protocol")
    if (
        protocol is None
        or sock.echo_pending
        or sock.queue._queue  # something is waiting for engine.io's writer
        or not sock.upgraded
        or sock.closed
        or sock.closing
        or not protocol.writable._value  # paused by flow control: a slow reader
        or protocol.close_sent
        or protocol.disconnected
    ):
        return None
    return protocol.transport


class _WriteBatch:
    """Frames gathered per transport during one pass of the event loop, written at its end.

    Several messages for one subscriber in the same pass (a busy channel) become one
    ``write`` system call instead of one each. The flush is scheduled with ``call_soon``,
    so a frame waits at most until the loop finishes the callbacks already queued.
    """

    def __init__(self) -> None:
        # a transport's one frame, or its frames once there are several (no list per
        # recipient in the common case: fewer objects for the garbage collector)
        self.pending: dict[Any, bytes | list[bytes]] = {}
        self.scheduled = False

    def add(self, transport: Any, frame: bytes) -> None:
        pending = self.pending
        frames = pending.get(transport)
        if frames is None:
            pending[transport] = frame
            if not self.scheduled:
                self.scheduled = True
                asyncio.get_running_loop().call_soon(self.flush)
        elif type(frames) is bytes:
            pending[transport] = [frames, frame]
        else:
            frames.append(frame)  # type: ignore[union-attr]

    def flush_one(self, transport: Any) -> None:
        """Write ``transport``'s frames now: something is about to take the queued path."""
        frames = self.pending.pop(transport, None)
        if frames and not transport.is_closing():
            transport.write(frames if type(frames) is bytes else b"".join(frames))

    def flush(self) -> None:
        pending, self.pending, self.scheduled = self.pending, {}, False
        for transport, frames in pending.items():
            if not transport.is_closing():
                transport.write(frames if type(frames) is bytes else b"".join(frames))


_batch = _WriteBatch()

queued_sockets: set[Any] = set()
"""Sockets that sent through engine.io's queue since the slow-consumer watchdog last looked."""


def _track(sock: Any, ws: Any, protocol: Any) -> None:
    """Let ``sock`` take the direct path, counting what it sends through engine.io's queue."""
    ws.owner = sock
    if getattr(sock, "echo_ws", None) is None:
        sock.echo_pending = 0
        queued_send = sock.send

        async def send(pkt: eio_packet.Packet) -> None:
            # messages and pings go direct (Echo's session loop, unlike engine.io's writer,
            # does not close a connection whose queue stayed empty for a ping period);
            # the rare rest (upgrade, noop, close) keeps engine.io's path
            kind = pkt.packet_type
            direct = kind == eio_packet.MESSAGE or kind == eio_packet.PING
            transport = _transport(sock) if direct else None
            if transport is not None and not pkt.binary:
                _batch.add(transport, websocket_text_frame(pkt.encode().encode()))
                return
            protocol = sock.__dict__.get("echo_protocol")
            if protocol is not None:
                _batch.flush_one(protocol.transport)  # keep order with what was batched
            sock.echo_pending += 1
            queued_sockets.add(sock)
            await queued_send(pkt)

        sock.send = send
        sock.schedule_ping = _heartbeat(sock, send)
    sock.echo_ws = ws
    if protocol is not None:  # the handshake is done: uvicorn never reads these again
        protocol.request = protocol.response = None
    usable = protocol is not None and not protocol.conn.extensions
    sock.echo_protocol = protocol if usable else None


_PING_FRAME = websocket_text_frame(b"2")  # engine.io PING


def _heartbeat(sock: Any, send: Any) -> Any:
    """engine.io's ``schedule_ping`` (called on every PONG) with a timer instead of a task.

    engine.io starts a task per ping that sleeps ``ping_interval``: a sleeping task, with its
    coroutine and frame, held by every idle connection. A timer callback does the same job;
    the ping itself is a prebuilt frame on the direct path.
    """
    loop = asyncio.get_running_loop()
    interval = sock.server.ping_interval
    pending: set[asyncio.Task[None]] = set()

    def ping() -> None:
        if sock.closing or sock.closed:
            return
        sock.last_ping = time.time()
        transport = _transport(sock)
        if transport is not None:
            _batch.add(transport, _PING_FRAME)
            return
        task = loop.create_task(send(eio_packet.Packet(eio_packet.PING)))
        pending.add(task)
        task.add_done_callback(pending.discard)

    def schedule_ping() -> None:
        if sock.last_ping:  # as engine.io: one ping per answered ping
            sock.last_ping = None
            loop.call_later(interval, ping)

    return schedule_ping


def websocket_class(base: type) -> type:
    """engine.io's ASGI WebSocket wrapper, made to register itself with its socket."""

    class TrackedWebSocket(base):  # type: ignore[misc,valid-type]
        def __init__(self, handler: Any, server: Any) -> None:
            super().__init__(handler, server)
            self.owner: Any = None
            self._socket = getattr(handler, "__self__", None)  # the engine.io socket

        async def __call__(self, environ: dict[str, Any]) -> Any:
            # as engine.io's wrapper does, plus tracking once the handshake is complete
            self.asgi_receive = environ["asgi.receive"]
            self.asgi_send = environ["asgi.send"]
            await self.asgi_send({"type": "websocket.accept"})
            if self._socket is None:
                await self.handler(self)
                return ""
            _track(self._socket, self, _protocol_of(self.asgi_send))
            await session.serve(self._socket, self)
            return ""

        async def send(self, message: Any) -> None:
            try:
                await super().send(message)
            finally:
                owner = self.owner
                # the upgrade's probe answer is written directly, not from the queue
                if owner is not None and owner.echo_pending and message != "3probe":
                    owner.echo_pending -= 1

    return TrackedWebSocket


def install(sio: socketio.AsyncServer) -> None:
    """Let this server's WebSocket connections take the direct path."""
    drivers = dict(sio.eio._async)
    drivers["websocket"] = websocket_class(drivers["websocket"])
    sio.eio._async = drivers


class FastEmitMixin(socketio.AsyncManager):
    """A manager whose local emits take the fast path (see the module docstring).

    Placed between python-socketio's pub/sub managers and ``AsyncManager`` in the MRO, so
    the Redis manager's local deliveries, both its own and those from other nodes, use it.
    """

    async def emit(self, event: str, data: Any, namespace: str, room: Any = None,
                   skip_sid: Any = None, callback: Any = None, to: Any = None,
                   **kwargs: Any) -> None:
        room = to or room
        if callback is not None or namespace not in self.rooms:
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                                      callback=callback, **kwargs)
        args = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        try:  # the EVENT packet's text, as python-socketio would encode it
            body = codec.dumps([event, *args])
        except TypeError:  # bytes in the data: binary attachments, python-socketio's path
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                                      **kwargs)
        encoded = ("2" if namespace == "/" else "2" + namespace + ",") + body
        message = eio_packet.Packet(eio_packet.MESSAGE, encoded)
        frame = websocket_text_frame(("4" + encoded).encode())
        skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        sockets = self.server.eio.sockets
        direct = queued = 0
        for sid, eio_sid in self.get_participants(namespace, room):
            if sid in skip:
                continue
            sock = sockets.get(eio_sid)
            if sock is None:
                continue
            transport = _transport(sock)
            if transport is not None:
                _batch.add(transport, frame)
                direct += 1
            else:
                await sock.send(message)
                queued += 1
        if direct:
            metrics.SOCKET_WRITES.inc("direct", direct)
        if queued:
            metrics.SOCKET_WRITES.inc("queued", queued)
        return None


class EchoManager(FastEmitMixin):
    """The single-node manager: python-socketio's in-memory one with the fast path."""

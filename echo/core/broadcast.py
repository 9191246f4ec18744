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
path. This couples to engine.io's socket internals (``queue``, ``upgraded``) and to
uvicorn's protocol (``transport``, ``writable``); the versions are pinned in pyproject.toml
and the behaviour is covered by every delivery test, which run with it on.
"""

from __future__ import annotations

import logging
from typing import Any

import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from echo.core import metrics

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
    """The asyncio transport to write to directly, or None if a direct write is not safe."""
    ws = getattr(sock, "echo_ws", None)
    if ws is None or not sock.upgraded or sock.closed or sock.closing:
        return None
    if sock.echo_pending or not sock.queue.empty():
        return None
    protocol = ws.protocol
    if (
        protocol is None
        or not protocol.writable.is_set()
        or protocol.disconnected
        or protocol.close_sent
        or not protocol.handshake_complete
        or protocol.conn.extensions
    ):
        return None
    transport = protocol.transport
    return None if transport.is_closing() else transport


def _track(sock: Any, ws: Any) -> None:
    """Count the packets a socket sends through engine.io's queue until they are written."""
    if getattr(sock, "echo_ws", None) is not None:
        sock.echo_ws = ws
        return
    sock.echo_ws = ws
    sock.echo_pending = 0
    queued_send = sock.send

    async def send(pkt: eio_packet.Packet) -> None:
        transport = _transport(sock)
        if transport is not None and not pkt.binary:
            encoded = pkt.encode()
            transport.write(websocket_text_frame(encoded.encode()))
            return
        sock.echo_pending += 1
        await queued_send(pkt)

    sock.send = send


def websocket_class(base: type) -> type:
    """engine.io's ASGI WebSocket wrapper, made to register itself with its socket."""

    class TrackedWebSocket(base):  # type: ignore[misc,valid-type]
        def __init__(self, handler: Any, server: Any) -> None:
            super().__init__(handler, server)
            self.protocol: Any = None
            self.owner = getattr(handler, "__self__", None)  # the engine.io socket

        async def __call__(self, environ: dict[str, Any]) -> Any:
            self.protocol = _protocol_of(environ.get("asgi.send"))
            if self.owner is not None:
                _track(self.owner, self)
            return await super().__call__(environ)

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
        pkt = self.server.packet_class(sio_packet.EVENT, namespace=namespace, data=[event, *args])
        encoded = pkt.encode()
        if isinstance(encoded, list):  # binary attachments: python-socketio's path
            return await super().emit(event, data, namespace, room=room, skip_sid=skip_sid,
                                      **kwargs)
        message = eio_packet.Packet(eio_packet.MESSAGE, encoded)
        frame = websocket_text_frame(message.encode().encode())
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
                transport.write(frame)
                direct += 1
            else:
                await sock.send(message)
                queued += 1
        if direct:
            metrics.SOCKET_WRITES.labels("direct").inc(direct)
        if queued:
            metrics.SOCKET_WRITES.labels("queued").inc(queued)
        return None


class EchoManager(FastEmitMixin):
    """The single-node manager: python-socketio's in-memory one with the fast path."""

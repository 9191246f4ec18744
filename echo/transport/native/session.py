"""One Engine.IO v4 session: its transport, its heartbeat, its outgoing messages, its end.

Idle sessions must cost next to nothing (10,000 of them on one node), so a session is one
object with ``__slots__`` and a single timer handle: the next PING, then the PONG deadline,
then the next PING. Nothing sleeps per session; the deadline is exact (``call_later``), and
only a PONG moves it (the spec: the client has ``pingTimeout`` to answer the PING).

Writes never wait. On a WebSocket served by Echo's own protocol
(:mod:`echo.transport.websocket_protocol`), the message's frame is written straight to the
connection, encoded once for all recipients. Under another ASGI server the message goes to
its ``send``, stepped by hand (:mod:`.sending`). Either finishes at once unless flow control
paused the connection; then later messages queue, in order, behind a task that waits for it
to drain (``backlog``). Past ``max_backlog`` the client is cut off. On long-polling, messages
wait in the buffer for the client's next GET, which the first of them wakes.

A WebSocket session holds its reader task while it waits for the client (``reader``): the
end of the session stops that wait, so the ASGI call returns and uvicorn closes the
connection even when no close frame can get out (a cut-off client that reads nothing).

The Socket.IO layer (:mod:`.sockets`) subclasses this and implements :meth:`on_message`,
:meth:`on_binary` and :meth:`on_close`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

from echo.transport.native import packets, sending
from echo.transport.native.packets import Message
from echo.transport.websocket_protocol import EchoWebSocketProtocol

if TYPE_CHECKING:
    from echo.transport.native.server import NativeTransport

MAX_HOLD = 1.0
"""Longest a throttled client goes unread (seconds)."""
log = logging.getLogger("echo.transport")

Send = Callable[[Message], Awaitable[None]]

# why a session ended, as Handler.disconnect hears it (socket.io's own wording)
TRANSPORT_CLOSE: Final = "transport close"
TRANSPORT_ERROR: Final = "transport error"
PING_TIMEOUT: Final = "ping timeout"
PARSE_ERROR: Final = "parse error"
FORCED_SERVER_CLOSE: Final = "forced server close"
CLIENT_NAMESPACE_DISCONNECT: Final = "client namespace disconnect"
SERVER_NAMESPACE_DISCONNECT: Final = "server namespace disconnect"

CLOSE_TIMEOUT: Final = 10.0
"""Seconds a closing WebSocket may take to get its close frame out."""


class EngineSession:
    """The Engine.IO side of one client, on polling or WebSocket (after an upgrade)."""

    __slots__ = (
        "awaiting_pong", "buffer", "close_reason", "closed", "drain_task", "getting", "held_until",
        "poll_waiter", "posting", "probe_answered", "probe_send", "reader", "server", "sid", "stalled",
        "timer", "transport", "ws_direct", "ws_send",
    )

    def __init__(self, server: NativeTransport, sid: str, transport: str) -> None:
        self.server = server
        self.sid = sid
        self.transport = transport
        """``polling`` or ``websocket``: where messages go now."""
        self.ws_send: Send | None = None
        self.ws_direct: EchoWebSocketProtocol | None = None
        """The connection itself, when the server is Echo's own (:mod:`..websocket_protocol`):
        messages are written to it directly, one frame encoding shared by all recipients."""
        self.stalled: deque[Message] | None = None
        """Messages queued behind a send that had to wait (None: nothing is waiting)."""
        self.drain_task: asyncio.Task[None] | None = None
        self.buffer: list[Message] = []
        """Long-polling: messages for the next GET."""
        self.poll_waiter: asyncio.Future[None] | None = None
        self.getting = False
        self.posting = False
        self.probe_send: Send | None = None
        """The WebSocket being probed for an upgrade (only one at a time)."""
        self.probe_answered = False
        """``3probe`` went out: the client is switching, so a GET is answered at once."""
        self.reader: asyncio.Task[Any] | None = None
        """The task reading the WebSocket, while it waits for the client's next message."""
        self.held_until = 0.0
        """Loop time before which the client's next message is not read (throttled)."""
        self.timer: asyncio.TimerHandle | None = None
        self.awaiting_pong = False
        self.closed = False
        self.close_reason = ""

    def hold(self, seconds: float) -> None:
        """Read nothing more for ``seconds`` (at most one: the heartbeat's PONGs wait too)."""
        until = asyncio.get_running_loop().time() + min(max(seconds, 0.0), MAX_HOLD)
        self.held_until = max(self.held_until, until)

    # --- heartbeat -----------------------------------------------------------------------

    def start(self) -> None:
        self.timer = self.server.loop.call_later(self.server.options.ping_interval, self._ping)

    def _ping(self) -> None:
        self.awaiting_pong = True
        self.timer = self.server.loop.call_later(self.server.options.ping_timeout, self._ping_timeout)
        self.write(packets.PING)

    def _ping_timeout(self) -> None:
        self.timer = None
        log.info("session %s: no pong within %.3g s, closing", self.sid, self.server.options.ping_timeout)
        self.close(PING_TIMEOUT)

    def on_pong(self) -> None:
        if self.awaiting_pong:
            self.awaiting_pong = False
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.server.loop.call_later(self.server.options.ping_interval, self._ping)

    # --- outgoing ------------------------------------------------------------------------

    def write(self, message: Message) -> None:
        """Send ``message`` after everything sent before it; never waits."""
        direct = self.ws_direct
        if direct is not None and self.stalled is None and not self.closed:
            # the hot path under Echo's own WebSocket server: one per recipient of a room write
            try:
                if direct.write(message):
                    return
            except OSError as exc:
                self._send_failed(exc)
                return
            self.stalled = deque((message,))
            self.drain_task = task = self.server.loop.create_task(self._drain_direct(direct))
            self.server.drains.add(task)
            task.add_done_callback(self.server.drains.discard)
            return
        send = self.ws_send
        if send is not None and self.stalled is None and not self.closed:
            # the hot path: one per recipient of every room write
            awaitable: Any = send(message)
            try:
                pending = awaitable.send(None)  # uvicorn's send() is a coroutine: step it here
            except StopIteration:
                return
            except AttributeError:  # an awaitable that is not a coroutine: the general way
                try:
                    awaitable, pending = sending.start(awaitable)
                except Exception as exc:
                    self._send_failed(exc)
                    return
                if pending is sending.DONE:
                    return
            except Exception as exc:  # the socket went away under us (uvicorn's ClientDisconnected)
                self._send_failed(exc)
                return
            self.stalled = deque()
            self.drain_task = task = self.server.loop.create_task(self._drain(send, awaitable, pending))
            self.server.drains.add(task)
            task.add_done_callback(self.server.drains.discard)
        elif self.closed:
            return
        elif send is None:
            self.buffer.append(message)
            waiter = self.poll_waiter
            if waiter is not None:
                self.poll_waiter = None
                if not waiter.done():
                    waiter.set_result(None)
            limit = self.server.options.max_backlog
            if limit and len(self.buffer) > limit:
                self._cut_off()
        else:
            queue = self.stalled
            assert queue is not None
            queue.append(message)
            limit = self.server.options.max_backlog
            if limit and len(queue) > limit:
                self._cut_off()

    def _send_failed(self, exc: Exception) -> None:
        log.debug("session %s: send failed: %r", self.sid, exc)
        self.close(TRANSPORT_ERROR)

    def write_all(self, messages: list[Message]) -> None:
        for message in messages:
            self.write(message)

    async def _drain(self, send: Send, steps: sending.Step, pending: Any) -> None:
        """Finish the send that had to wait, then what queued behind it, in order."""
        queue = self.stalled
        assert queue is not None
        try:
            await sending.Resume(steps, pending)
            while queue:
                await send(queue.popleft())
        except Exception as exc:
            self._send_failed(exc)
        finally:
            if self.stalled is queue:
                self.stalled = None
                self.drain_task = None

    async def _drain_direct(self, direct: EchoWebSocketProtocol) -> None:
        """Write what queued while flow control paused the connection, in order, as it allows."""
        queue = self.stalled
        assert queue is not None
        try:
            while queue:
                await direct.writable()
                while queue and direct.write(queue[0]):
                    queue.popleft()
        except Exception as exc:
            self._send_failed(exc)
        finally:
            if self.stalled is queue:
                self.stalled = None
                self.drain_task = None

    def backlog(self) -> int:
        """Messages accepted and not yet handed to the socket (or to a GET)."""
        if self.ws_send is None:
            return len(self.buffer)
        return len(self.stalled) if self.stalled is not None else 0

    def _cut_off(self) -> None:
        self.server.slow_consumers += 1
        log.warning("session %s: slow consumer, %d messages waiting (max_backlog %d): disconnecting it",
                    self.sid, self.backlog(), self.server.options.max_backlog)
        self.close(FORCED_SERVER_CLOSE)

    def take_buffer(self) -> list[Message]:
        messages, self.buffer = self.buffer, []
        return messages

    def release_poll(self) -> None:
        """The probe is answered (``3probe``): the client is moving to WebSocket, so the pending
        GET, and any GET until the switch, gets a ``noop`` (an earlier one would only make the
        client poll again at once)."""
        self.probe_answered = True
        if self.poll_waiter is not None and not self.buffer:
            self.write(packets.NOOP)

    def end_probe(self) -> None:
        """The probe WebSocket is done with (switched to, abandoned or closed)."""
        self.probe_send = None
        self.probe_answered = False

    def upgrade(self, send: Send, direct: EchoWebSocketProtocol | None) -> None:
        """The probed WebSocket becomes the transport; what waited for a GET goes there."""
        self.end_probe()
        waiting = self.take_buffer()
        if self.poll_waiter is not None:
            self.write(packets.NOOP)  # a GET still pending ends cleanly
        self.transport = "websocket"
        self.ws_send = send
        self.ws_direct = direct
        self.write_all(waiting)

    # --- incoming ------------------------------------------------------------------------

    async def receive_text(self, text: str) -> None:
        """One Engine.IO text packet from the client."""
        kind = text[:1]
        if kind == packets.EIO_MESSAGE:
            await self.on_message(text[1:])
        elif kind == packets.EIO_PONG:
            self.on_pong()
        elif kind == packets.EIO_CLOSE:
            self.close(TRANSPORT_CLOSE, by_client=True)
        elif kind in (packets.EIO_OPEN, packets.EIO_UPGRADE, packets.EIO_NOOP):
            pass  # nothing to do with these on an open transport
        else:  # PING included: in v4 only the server pings ("invalid heartbeat direction")
            self.invalid("not an Engine.IO packet this server accepts", text)

    async def receive_binary(self, data: bytes) -> None:
        await self.on_binary(data)

    def invalid(self, what: str, text: str | bytes) -> None:
        log.info("session %s: %s: %r, closing", self.sid, what, text[:80])
        self.close(PARSE_ERROR)

    async def on_message(self, text: str) -> None:
        raise NotImplementedError

    async def on_binary(self, data: bytes) -> None:
        raise NotImplementedError

    def on_close(self, reason: str) -> None:
        """The session just closed (synchronously, from anywhere: never mutate what a caller
        may be iterating; schedule instead)."""

    # --- end -----------------------------------------------------------------------------

    def close(self, reason: str, *, code: int = 1000, by_client: bool = False,
              notify: bool = False) -> None:
        """End the session now; idempotent.

        WebSocket: closed with ``code``. Long-polling: a pending GET gets ``close`` (``noop``
        if the client itself asked to close); with ``notify`` a client between two GETs gets
        the ``close`` packet with its next GET, for up to ``ping_timeout``.
        """
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        server = self.server
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.probe_send is not None:
            self._send_detached(self.probe_send, {"type": "websocket.close", "code": code})
            self.end_probe()
        if self.ws_send is not None:
            server.forget(self)
            if self.stalled is not None:  # the client does not read: nothing more will get out
                self.stalled.clear()
                if self.drain_task is not None:
                    self.drain_task.cancel()
            else:
                self._send_detached(self.ws_send, {"type": "websocket.close", "code": code})
            if self.reader is not None:  # it waits for the client, who may never send again
                self.reader.cancel()
        else:
            final = packets.NOOP if by_client else packets.CLOSE
            if self.poll_waiter is not None:
                self.buffer = [final]
                waiter, self.poll_waiter = self.poll_waiter, None
                if not waiter.done():
                    waiter.set_result(None)
                server.forget(self)
            elif notify and not by_client:
                self.buffer.append(final)
                self.timer = server.loop.call_later(server.options.ping_timeout, server.forget, self)
            else:
                self.buffer = []
                server.forget(self)
        self.on_close(reason)

    def _send_detached(self, send: Send, message: Message) -> None:
        try:
            steps, pending = sending.start(send(message))
        except Exception:
            return  # already gone
        if pending is not sending.DONE:
            self.server.spawn(_finish_send(steps, pending))


async def _finish_send(steps: sending.Step, pending: Any) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await sending.Resume(steps, pending)
    except (TimeoutError, Exception):
        pass

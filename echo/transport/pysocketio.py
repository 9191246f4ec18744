"""Echo's wire on python-socketio, through its public API only: the reference and the fallback.

python-socketio owns the sockets, Engine.IO and the packets; this module keeps what the core
needs beside it: the connections, their rooms (python-socketio's rooms are mirrored through
``enter_room``/``leave_room``), one ordered writer, and a per-connection inbox so the core's
calls for one connection never overlap.

**Acks.** python-socketio sends a handler's return value as the ACK when the client asked for
one, and does not tell the handler whether it did. Echo must know (an event without an ack
gets its refusal as an ``error`` event). The server is given python-socketio's documented
``serializer`` hook, a :class:`socketio.packet.Packet` subclass whose ``decode()`` rewrites
every incoming EVENT ``[event, *args]`` as ``[ENVELOPE, event, wants_ack, *args]``. The
catch-all handler so learns ``wants_ack``; and a client event named ``connect`` or
``disconnect`` can no longer reach python-socketio's connect/disconnect handlers (it would
have, with catch-all handlers). When an ack is wanted, the handler's task awaits a future that
:meth:`PySocketIOConnection.ack` resolves and returns its value, so the core may answer later
from any task. The future is resolved by the writer, and the writer waits for python-socketio
to queue that ACK: an ack leaves after everything written to its connection before it.

**Order.** python-socketio starts a task per event (``async_handlers=True``, needed so an ack
can wait); each task appends to its connection's inbox at its first step, and asyncio starts
tasks in the order they were created, so the inbox holds a connection's events in arrival
order. One drain task per busy connection feeds them to the core one at a time. Everything
sent (room writes, emits, acks, room changes, server disconnects) goes through one queue and
one writer task, since ``AsyncServer.emit`` is not meant to be called concurrently.

**Closing.** :meth:`PySocketIOTransport.close` closes each Socket.IO WebSocket through its ASGI
``send`` (code 1012, as uvicorn does at shutdown) and the remaining long-polling sessions
through ``eio.disconnect``: both are a transport close to socket.io-client, which reconnects.
(engine.io's CLOSE packet alone is ignored by socket.io-client on a WebSocket.)

What this transport cannot do through the public API (the native transport does):

- frames are decoded and re-encoded per room write (python-socketio cannot write prepared
  bytes);
- engine.io's per-socket send queue is not visible: :meth:`~PySocketIOConnection.backlog`
  counts what waits in this transport's own queue only, and the slow-consumer cutoff
  (``max_backlog``) is native-only;
- no namespace connect timeout (``connect_timeout`` is ignored): an Engine.IO session that
  never sends CONNECT lives as long as it answers pings;
- :meth:`~PySocketIOConnection.throttle` cannot stop python-engineio reading the socket: a
  throttled connection's events wait in its inbox instead (a flood fills it and is cut off at
  ``INBOX_LIMIT``), so its frames are still parsed;
- python-engineio refuses a whole polling POST of more than 16 packets (the python client
  reads server payloads under the same limit), logs an invalid packet instead of closing the
  connection, advertises a sub-second ``pingInterval`` as 0, and leaves the pending long-poll
  of a client that closed open until it times out; python-socketio hands an empty ``auth``
  (``{}``) to the connect handler as None;
- events written during :meth:`Handler.connect` may reach the client before its CONNECT
  (python-socketio writes to a connection it has not accepted yet; clients buffer them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import socketio  # type: ignore[import-untyped]
from socketio import packet as sio_packet
from socketio.exceptions import ConnectionRefusedError as SocketIORefusal  # type: ignore[import-untyped]
from starlette.types import ASGIApp, Receive, Scope, Send

from echo.transport import codec
from echo.transport.base import Connection, Frame, Handler, Refused, Transport, TransportOptions

log = logging.getLogger("echo.transport.pysocketio")

ENVELOPE = "echo:event"
"""The event name python-socketio sees for every client event (never ``connect``/``disconnect``)."""

GONE = object()
"""Resolves a pending ack whose connection left: python-socketio sends nothing."""

INBOX_LIMIT = 1000
"""Events of one connection waiting for the core beyond which the client is disconnected."""

CLOSE_TIMEOUT = 5.0
"""Seconds :meth:`PySocketIOTransport.close` gives each of its steps."""

ROOM_PREFIX = "#"
"""Before every room name given to python-socketio, which keeps each sid as a room of its own:
``#`` is outside the sid alphabet, so a channel named like a sid never reaches that client."""

SOCKETIO_PATH = "/socket.io/"
"""Where python-socketio's ASGI app serves (its default ``socketio_path``)."""

MAX_HOLD = 1.0
"""Longest a throttled connection's next event waits (seconds)."""

ACK_QUEUED_TIMEOUT = 1.0
"""Seconds the writer waits for python-socketio to queue an ACK it was handed."""


def event_packet_class(max_attachments: int) -> type[Any]:
    """A Packet class (one per server: python-socketio sets its ``json`` on the class) that
    tells the catch-all handler whether an event wants an ack and bounds attachments."""

    class EventPacket(sio_packet.Packet):  # type: ignore[misc]
        data: Any

        def decode(self, encoded_packet: str | bytes) -> int:
            attachments = int(super().decode(encoded_packet) or 0)
            if self.packet_type in (sio_packet.BINARY_EVENT, sio_packet.BINARY_ACK) and \
                    attachments > max_attachments:
                raise ValueError(f"a packet may carry at most {max_attachments} binary attachments")
            if self.packet_type in (sio_packet.EVENT, sio_packet.BINARY_EVENT):
                data = self.data
                if not (isinstance(data, list) and data and isinstance(data[0], str)):
                    raise ValueError("an EVENT carries a list that starts with the event name")
                self.data = [ENVELOPE, data[0], self.id is not None, *data[1:]]
            return attachments

    return EventPacket


def is_socketio_websocket(scope: Scope) -> bool:
    """Whether python-socketio's ASGI app serves this as a Socket.IO WebSocket."""
    path = str(scope.get("path", ""))
    return scope["type"] == "websocket" and (path if path.endswith("/") else path + "/").startswith(
        SOCKETIO_PATH)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A frame as python-socketio's ``emit`` takes it (cached in ``Frame.wire``)."""

    event: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Incoming:
    event: str
    args: list[Any]
    ack_id: int | None


@dataclass(frozen=True, slots=True)
class Leaving:
    reason: str


@dataclass(frozen=True, slots=True)
class Pending:
    """An event waiting for the core's ack: the future its python-socketio task awaits."""

    future: asyncio.Future[Any]
    task: asyncio.Task[Any] | None


@dataclass(frozen=True, slots=True)
class Job:
    """One step of the writer; ``targets`` are the connections it counts in their backlog."""

    run: Callable[[], Awaitable[Any]]
    targets: tuple[PySocketIOConnection, ...]


class PySocketIOConnection(Connection):
    """One namespace connection of python-socketio, as the core sees it."""

    def __init__(self, transport: PySocketIOTransport, sid: str, namespace: str) -> None:
        self.transport = transport
        self.sid = sid
        self.namespace = namespace
        self.joined: set[str] = set()
        self.queued = 0
        """Packets for it in the writer's queue."""
        self.inbox: deque[Incoming | Leaving] = deque()
        self.busy = True
        """Its handshake or a drain of its inbox is running (starts busy: the handshake)."""
        self.accepted = False
        """Accepted by the core and not yet told it left."""
        self.gone = False
        self.cut_off = False
        self.closing: str | None = None
        """Why this transport itself is ending it (told to the core before python-socketio's)."""
        self.pending: dict[int, Pending] = {}
        self.ack_ids = itertools.count(1)
        self.last_transport = "polling"
        self.eio_sid = ""
        """The Engine.IO session it belongs to (one client may be in several namespaces)."""
        self.held_until = 0.0
        """Loop time before which its next event is not handed to the core (throttled)."""

    @property
    def connected(self) -> bool:
        return self.accepted

    @property
    def transport_name(self) -> str:
        with contextlib.suppress(KeyError):  # the session is gone: what it last used
            self.last_transport = self.transport.transport_of(self.sid, self.namespace)
        return self.last_transport

    @property
    def rooms(self) -> frozenset[str]:
        return frozenset(self.joined)

    def emit(self, event: str, *args: Any) -> None:
        if self.gone:
            return
        send = functools.partial(self.transport.sio.emit, event, tuple(args), to=self.sid,
                                 namespace=self.namespace)
        self.transport.enqueue(send, (self,))

    def write(self, frame: Frame) -> None:
        if self.gone:
            return
        decoded = self.transport.decoded(frame)
        send = functools.partial(self.transport.sio.emit, decoded.event, decoded.args, to=self.sid,
                                 namespace=self.namespace)
        self.transport.enqueue(send, (self,))

    def ack(self, ack_id: int, *args: Any) -> None:
        pending = self.pending.pop(ack_id, None)
        if pending is None:  # answered already, never asked, or the connection left
            return
        self.transport.enqueue(functools.partial(self.transport.answer, pending, args), (self,))

    def backlog(self) -> int:
        return self.queued

    def throttle(self, seconds: float) -> None:
        until = asyncio.get_running_loop().time() + min(max(seconds, 0.0), MAX_HOLD)
        self.held_until = max(self.held_until, until)

    async def close(self) -> None:
        await self.transport.disconnect(self)

    def __repr__(self) -> str:
        return f"PySocketIOConnection({self.namespace[:80]!r}, {self.sid!r})"


class PySocketIOTransport(Transport):
    """A python-socketio ``AsyncServer`` behind Echo's transport interface."""

    name = "python-socketio"

    def __init__(self, handler: Handler, options: TransportOptions) -> None:
        super().__init__(handler, options)
        origins: str | list[str] = "*" if options.cors_origins == ("*",) else list(options.cors_origins)
        self.sio: Any = socketio.AsyncServer(
            async_mode="asgi",
            namespaces="*",
            cors_allowed_origins=origins,
            ping_interval=options.ping_interval,
            ping_timeout=options.ping_timeout,
            max_http_buffer_size=options.max_payload,
            json=codec,
            serializer=event_packet_class(options.max_attachments),
            logger=False,
            engineio_logger=False,
        )
        self.sio.on("connect", self.on_connect, namespace="*")
        self.sio.on("disconnect", self.on_disconnect, namespace="*")
        self.sio.on("*", self.on_event, namespace="*")
        self.registry: dict[str, PySocketIOConnection] = {}
        """Every namespace connection by sid, from its CONNECT until the core was told it left."""
        self.namespaces_of: dict[str, int] = {}
        """Namespace connections per Engine.IO session (``max_namespaces`` holds them)."""
        self.members: dict[tuple[str, str], set[PySocketIOConnection]] = {}
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.writer: asyncio.Task[None] | None = None
        self.drains: set[asyncio.Task[None]] = set()
        self.websockets: dict[Send, asyncio.Task[Any]] = {}
        """The ASGI ``send`` of each open Socket.IO WebSocket, with the task serving it."""

    def asgi(self, other: ASGIApp) -> ASGIApp:
        """python-socketio's ASGI app, remembering each Socket.IO WebSocket so :meth:`close`
        can close it the way uvicorn does at shutdown (python-socketio cannot: its CLOSE
        packet is ignored by socket.io-client on a WebSocket)."""
        inner: ASGIApp = socketio.ASGIApp(self.sio, other_asgi_app=other)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            task = asyncio.current_task()
            if task is None or not is_socketio_websocket(scope):
                await inner(scope, receive, send)
                return
            self.websockets[send] = task
            try:
                await inner(scope, receive, send)
            finally:
                del self.websockets[send]

        return app

    async def start(self) -> None:
        self.ensure_writer()

    def transport_of(self, sid: str, namespace: str) -> str:
        """``websocket`` or ``polling``; KeyError once the session is gone. (Asked of engine.io:
        ``AsyncServer.transport`` takes a namespace only since python-socketio 5.12.)"""
        return str(self.sio.eio.transport(self.sio.manager.eio_sid_from_sid(sid, namespace)))

    # -- rooms ------------------------------------------------------------------------

    def join(self, conn: Connection, room: str) -> bool:
        own = self.own(conn)
        if own.gone or room in own.joined:
            return False
        own.joined.add(room)
        members = self.members.setdefault((own.namespace, room), set())
        members.add(own)
        self.enqueue(functools.partial(self.enter_room, own, room), ())
        return len(members) == 1

    def leave(self, conn: Connection, room: str) -> bool:
        own = self.own(conn)
        if room not in own.joined:
            return False
        own.joined.discard(room)
        emptied = self.drop_member(own, room)
        self.enqueue(functools.partial(self.leave_room, own, room), ())
        return emptied

    def has_members(self, namespace: str, room: str) -> bool:
        return bool(self.members.get((namespace, room)))

    def connections(self) -> Iterable[Connection]:
        return [conn for conn in self.registry.values() if conn.accepted]

    def drop_member(self, conn: PySocketIOConnection, room: str) -> bool:
        """Take ``conn`` out of this transport's view of ``room``; True if that emptied it."""
        key = (conn.namespace, room)
        members = self.members.get(key)
        if members is None:
            return False
        members.discard(conn)
        if members:
            return False
        del self.members[key]
        return True

    async def enter_room(self, conn: PySocketIOConnection, room: str) -> None:
        if conn.gone:
            return
        with contextlib.suppress(KeyError):  # python-socketio already forgot the connection
            await self.sio.enter_room(conn.sid, ROOM_PREFIX + room, namespace=conn.namespace)

    async def leave_room(self, conn: PySocketIOConnection, room: str) -> None:
        with contextlib.suppress(KeyError):
            await self.sio.leave_room(conn.sid, ROOM_PREFIX + room, namespace=conn.namespace)

    @staticmethod
    def own(conn: Connection) -> PySocketIOConnection:
        if not isinstance(conn, PySocketIOConnection):
            raise TypeError(f"{conn!r} is not a connection of the python-socketio transport")
        return conn

    # -- writing ----------------------------------------------------------------------

    def write(self, namespace: str, room: str, frame: Frame) -> int:
        members = self.members.get((namespace, room))
        if not members:
            return 0
        decoded = self.decoded(frame)
        send = functools.partial(self.sio.emit, decoded.event, decoded.args, room=ROOM_PREFIX + room,
                                 namespace=namespace)
        self.enqueue(send, tuple(members))
        return len(members)

    @staticmethod
    def decoded(frame: Frame) -> Decoded:
        decoded = frame.wire
        if not isinstance(decoded, Decoded):
            _, event, args = frame.decode()
            decoded = frame.wire = Decoded(event, tuple(args))
        return decoded

    def enqueue(self, run: Callable[[], Awaitable[Any]],
                targets: tuple[PySocketIOConnection, ...]) -> None:
        """Put one step on the ordered writer's queue (never waits)."""
        for conn in targets:
            conn.queued += 1
        self.queue.put_nowait(Job(run, targets))
        self.ensure_writer()

    def ensure_writer(self) -> None:
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self.write_loop())

    async def write_loop(self) -> None:
        while True:
            job = await self.queue.get()
            try:
                await job.run()
            except Exception:  # one bad step (a value JSON cannot hold) must not stop the rest
                log.exception("python-socketio transport: a write failed")
            finally:
                for conn in job.targets:
                    conn.queued -= 1
                self.queue.task_done()

    async def answer(self, pending: Pending, args: tuple[Any, ...]) -> None:
        """Hand an ack to the event's python-socketio task; wait until it has queued the ACK."""
        if pending.future.done():
            return
        pending.future.set_result(args)
        if pending.task is not None and pending.task is not asyncio.current_task():
            await asyncio.wait({pending.task}, timeout=ACK_QUEUED_TIMEOUT)

    async def disconnect(self, conn: PySocketIOConnection) -> None:
        """Server-side DISCONNECT of one namespace connection, after what was written to it."""
        if conn.gone:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def send() -> None:
            try:
                if not conn.gone:
                    conn.closing = conn.closing or "server disconnect"
                    await self.sio.disconnect(conn.sid, namespace=conn.namespace)
            finally:
                if not done.done():
                    done.set_result(None)

        self.enqueue(send, ())
        await done

    async def flush(self) -> None:
        """Wait for this transport's queue only: engine.io's socket queues are not visible."""
        await self.queue.join()

    async def close(self) -> None:
        """Close every Engine.IO session as a transport close, so Socket.IO clients reconnect:
        WebSockets with close code 1012 (as uvicorn at shutdown), then what remains (long-
        polling sessions) through engine.io, whose CLOSE packet a polling client obeys."""
        for conn in self.registry.values():
            conn.closing = "transport close"
        serving = set(self.websockets.values())
        for send in list(self.websockets):
            with contextlib.suppress(Exception):  # closed meanwhile: nothing to do
                await send({"type": "websocket.close", "code": 1012})
        if serving:  # engine.io ends each session when its client answers the close
            await asyncio.wait(serving, timeout=CLOSE_TIMEOUT)
        sessions = {self.sio.manager.eio_sid_from_sid(conn.sid, conn.namespace)
                    for conn in self.registry.values() if conn.accepted}
        sessions.discard(None)
        if sessions:
            loop = asyncio.get_running_loop()
            closing = {loop.create_task(self.sio.eio.disconnect(eio_sid)) for eio_sid in sessions}
            _, late = await asyncio.wait(closing, timeout=CLOSE_TIMEOUT)
            for task in late:  # a client that stopped reading: its CLOSE never gets out
                task.cancel()
        if self.drains:  # every Handler.disconnect those closes started
            await asyncio.wait(set(self.drains), timeout=CLOSE_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.flush()
        await self.sio.shutdown()
        if self.writer is not None and self.queue.empty():
            self.writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.writer
            self.writer = None

    # -- python-socketio's handlers ---------------------------------------------------

    async def on_connect(self, namespace: str, sid: str, environ: Any = None, auth: Any = None) -> None:
        conn = PySocketIOConnection(self, sid, namespace)
        eio_sid = str(self.sio.manager.eio_sid_from_sid(sid, namespace))
        held = self.namespaces_of.get(eio_sid, 0)
        limit = self.options.max_namespaces
        if held >= limit:  # one socket must not hold many apps' slots
            raise SocketIORefusal(f"this connection is in {limit} namespaces already (the limit)")
        conn.eio_sid = eio_sid
        self.namespaces_of[eio_sid] = held + 1
        self.registry[sid] = conn
        try:
            await self.handler.connect(conn, auth)
        except Refused as exc:
            self.forget(conn)
            refusal = (exc.message,) if exc.data is None else (exc.message, exc.data)
            raise SocketIORefusal(*refusal) from None
        except Exception:
            log.exception("accepting a connection to %r failed", namespace[:80])
            self.forget(conn)
            raise SocketIORefusal("internal error: the server could not accept this connection") from None
        conn.accepted = True
        conn.busy = False
        try:
            conn.last_transport = self.transport_of(sid, namespace)
        except KeyError:
            # the session closed while the core accepted it, and python-socketio does not
            # report the disconnect of a connection it has not accepted: tell the core here
            conn.inbox.append(Leaving("transport close"))
            self.kick(conn)
            raise SocketIORefusal("the connection closed while it was being accepted") from None
        self.kick(conn)

    async def on_event(self, envelope: str, namespace: str, sid: str, *data: Any) -> Any:
        conn = self.registry.get(sid)
        if envelope != ENVELOPE or len(data) < 2 or conn is None or not conn.accepted:
            return self.sio.not_handled
        event, wants_ack, *args = data
        if len(conn.inbox) >= INBOX_LIMIT:
            self.cut_off(conn)
            return self.sio.not_handled
        pending: Pending | None = None
        ack_id: int | None = None
        if wants_ack is True:
            ack_id = next(conn.ack_ids)
            pending = Pending(asyncio.get_running_loop().create_future(), asyncio.current_task())
            conn.pending[ack_id] = pending
        conn.inbox.append(Incoming(event, args, ack_id))
        self.kick(conn)
        if pending is None:
            return self.sio.not_handled
        reply = await pending.future
        return self.sio.not_handled if reply is GONE else reply

    async def on_disconnect(self, namespace: str, sid: str, reason: Any = None) -> None:
        """python-socketio >= 5.12 passes a reason; 5.11 does not, and a client's leaving is
        then told as ``client disconnect`` whatever ended it."""
        conn = self.registry.get(sid)
        if conn is None or conn.gone:
            return
        # event tasks python-socketio started before this call take their first step (and
        # join the inbox) before this one continues: the disconnect queues behind them
        await asyncio.sleep(0)
        reason = conn.closing or (reason if isinstance(reason, str) else "client disconnect")
        conn.inbox.append(Leaving(reason))
        self.kick(conn)

    # -- the core's side of a connection ------------------------------------------------

    def kick(self, conn: PySocketIOConnection) -> None:
        """Start draining ``conn``'s inbox unless that already runs (or its handshake does)."""
        if conn.busy or not conn.inbox:
            return
        conn.busy = True
        task = asyncio.get_running_loop().create_task(self.drain(conn))
        self.drains.add(task)
        task.add_done_callback(self.drains.discard)

    async def drain(self, conn: PySocketIOConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            while conn.inbox:
                held = conn.held_until - loop.time()
                if held > 0 and isinstance(conn.inbox[0], Incoming) and not any(
                        isinstance(item, Leaving) for item in conn.inbox):  # gone: no waiting
                    await asyncio.sleep(held)  # throttled: its events wait in its inbox
                    continue
                item = conn.inbox.popleft()
                if isinstance(item, Incoming):
                    await self.deliver(conn, item)
                else:
                    await self.finish(conn, item.reason)
        finally:
            conn.busy = False

    async def deliver(self, conn: PySocketIOConnection, item: Incoming) -> None:
        if not conn.accepted:
            self.abandon(conn, item.ack_id)
            return
        try:
            await self.handler.event(conn, item.event, item.args, item.ack_id)
        except Exception:
            log.exception("%r: handling event %r failed", conn, item.event[:80])
            self.abandon(conn, item.ack_id)

    async def finish(self, conn: PySocketIOConnection, reason: str) -> None:
        """Tell the core once, while ``conn`` is still in its rooms; then forget it (rooms the
        core did not leave in its disconnect handler are dropped without a report)."""
        if conn.gone:
            return
        try:
            if conn.accepted:
                await self.handler.disconnect(conn, reason)
        except Exception:
            log.exception("%r: the disconnect handler failed", conn)
        finally:
            self.forget(conn)

    def abandon(self, conn: PySocketIOConnection, ack_id: int | None) -> None:
        """No ack will come for ``ack_id``: let its python-socketio task end without one."""
        if ack_id is None:
            return
        pending = conn.pending.pop(ack_id, None)
        if pending is not None and not pending.future.done():
            pending.future.set_result(GONE)

    def forget(self, conn: PySocketIOConnection) -> None:
        if not conn.gone and conn.eio_sid:
            left = self.namespaces_of.pop(conn.eio_sid, 1) - 1
            if left > 0:
                self.namespaces_of[conn.eio_sid] = left
        conn.accepted = False
        conn.gone = True
        if self.registry.get(conn.sid) is conn:
            del self.registry[conn.sid]
        for room in conn.joined:
            self.drop_member(conn, room)
        conn.joined.clear()
        for pending in conn.pending.values():
            if not pending.future.done():
                pending.future.set_result(GONE)
        conn.pending.clear()
        conn.inbox.clear()

    def cut_off(self, conn: PySocketIOConnection) -> None:
        """A client sending faster than the core handles its events: disconnect it once."""
        if conn.cut_off:
            return
        conn.cut_off = True
        conn.closing = "server disconnect"
        log.warning("%r: over %d events waiting; disconnecting it", conn, INBOX_LIMIT)
        self.enqueue(functools.partial(self.sio.disconnect, conn.sid, namespace=conn.namespace), ())

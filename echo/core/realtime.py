"""The Socket.IO side: connect/auth, subscribe, unsubscribe, publish, presence and status.

Each app is the namespace ``/<appName>`` (as in Ekko). Handlers answer an ack callback with
``{ok: true, ...}`` or ``{ok: false, error: {code, message}}``; a client that passed no
callback (Ekko's own) gets refusals as an ``error`` event instead, so nothing fails silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import socketio
from socketio import packet as sio_packet

from echo.config import Settings
from echo.core import broadcast, codec, metrics, protocol
from echo.core.associations import Rule
from echo.core.auth import AuthError, Claims, verify_token
from echo.core.pipeline import Envelope, Overloaded, Pipeline
from echo.core.protocol import ADMIN_CHANNEL, ProtocolError
from echo.core.runners import FunctionError

log = logging.getLogger("echo.realtime")

class _Request(NamedTuple):
    """Where an event came from, so an answer can be sent later (``id`` None: no ack wanted)."""

    eio_sid: str
    namespace: str
    id: int | None


_request: contextvars.ContextVar[_Request] = contextvars.ContextVar("request")


class _InlineServer(socketio.AsyncServer):
    """Runs event handlers inline in the connection's reader instead of a task per event.

    python-socketio starts a task for every event, a large share of the cost per message.
    Echo's handlers return quickly; the one that may not (a publish through functions) moves
    itself to a task and answers from there (``Realtime._answer``). It also records where
    each event came from, so refusals without an ack become ``error`` events.
    """

    event_handler: Callable[..., Awaitable[Any]] | None = None
    """Every event of every namespace goes here when set (Echo's handlers are catch-all)."""

    async def _handle_event(self, eio_sid, namespace, id, data):  # type: ignore[no-untyped-def]
        namespace = namespace or "/"
        sid = self.manager.sid_from_eio_sid(eio_sid, namespace)
        if self.manager.is_connected(sid, namespace):
            await self._handle_event_internal(self, sid, eio_sid, data, namespace, id)

    async def _handle_event_internal(self, server, sid, eio_sid, data, namespace, id):  # type: ignore[no-untyped-def]
        request = _Request(eio_sid, namespace, id)
        _request.set(request)
        if self.event_handler is not None:  # skips python-socketio's per-event handler lookup
            reply = await self.event_handler(data[0], namespace, sid, *data[1:])
        else:
            reply = await server._trigger_event(data[0], namespace, sid, *data[1:])
        if reply is not self.not_handled and id is not None:
            await self.answer(request, reply)

    async def answer(self, request: _Request, reply: Any) -> None:
        """Send the ack; its text is built directly, python-socketio's packet only for binary."""
        args = [] if reply is None else list(reply) if isinstance(reply, tuple) else [reply]
        prefix = "3" if request.namespace == "/" else "3" + request.namespace + ","
        try:
            text = prefix + str(request.id) + codec.dumps(args)
        except TypeError:  # bytes in the reply: a binary ack
            await self._send_packet(request.eio_sid, self.packet_class(
                sio_packet.ACK, namespace=request.namespace, id=request.id, data=args))
            return
        await self.eio.send(request.eio_sid, text)


DEFERRED = object()
"""A handler's return value meaning: the answer will be sent later, from a task."""


@dataclass
class Client:
    app: str
    uuid: str
    admin: bool
    claims: Claims
    channels: set[str] = field(default_factory=set)
    bucket: TokenBucket | None = None


def status_payload(event: str, app: str, **details: Any) -> dict[str, Any]:
    """A ``status`` event: Ekko's ``{message: {event, app, uuid, admin}}`` plus flat fields."""
    core = {
        "event": event,
        "app": app,
        "uuid": details.pop("uuid", None),
        "admin": details.pop("admin", False),
    }
    return {**core, **details, "ts": int(time.time() * 1000), "message": dict(core)}


class TokenBucket:
    """Publish rate limit: ``rate`` tokens a second, up to ``burst`` saved up."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = time.monotonic()

    def take(self) -> float:
        """Take one token; return 0 if granted, else the seconds until one is available."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Realtime:
    """Owns the Socket.IO server and the per-connection state of this node."""

    def __init__(
        self,
        settings: Settings,
        make_pipeline: Callable[[Realtime], Pipeline],
        client_manager: socketio.AsyncManager | None = None,
    ) -> None:
        self.settings = settings
        # headroom over the message limit for the envelope; a bigger frame is refused by
        # engine.io before it reaches a handler
        buffer = max(settings.max_message_bytes * 2 + 16 * 1024, 1024 * 1024)
        self.sio = _InlineServer(
            async_mode="asgi",
            namespaces="*",
            client_manager=client_manager,
            cors_allowed_origins=list(settings.cors_origins)
            if settings.cors_origins != ("*",)
            else "*",
            max_http_buffer_size=buffer,
            json=codec,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
            logger=False,
            engineio_logger=False,
        )
        if settings.fast_broadcast:
            broadcast.install(self.sio)
        self.clients: dict[str, Client] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.connections_per_app: dict[str, int] = {}
        self.draining = False
        self.pipeline = make_pipeline(self)
        self.sio.on("connect", self._on_connect, namespace="*")
        self.sio.on("disconnect", self._on_disconnect, namespace="*")
        self.sio.on("*", self._on_event, namespace="*")
        self.sio.event_handler = self._on_event

    # -- delivery ---------------------------------------------------------------------

    async def deliver(self, envelope: Envelope) -> None:
        payload = {
            "channel": envelope.channel,
            "message": envelope.message,
            "uuid": envelope.uuid,
            "id": envelope.id,
            "seq": envelope.seq,
            "ts": envelope.ts,
        }
        metrics.MESSAGES_DELIVERED.inc(envelope.app)
        await self.sio.emit("message", payload, room=envelope.channel, namespace="/" + envelope.app)

    async def status(self, app: str, event: str, *, local: bool = False, **details: Any) -> None:
        """Tell the app's admin sockets what happened (``local``: on this node only)."""
        await self.sio.emit(
            "status", status_payload(event, app, **details), room=ADMIN_CHANNEL,
            namespace="/" + app, ignore_queue=local,
        )

    async def report_function_error(
        self, envelope: Envelope, error: FunctionError, elapsed: float
    ) -> None:
        log.warning("%s/%s: %s", envelope.app, envelope.channel, error)
        await self.status(
            envelope.app,
            "function_error",
            uuid=envelope.uuid,
            channel=envelope.channel,
            function=error.function,
            kind=error.kind,
            error=error.detail,
            messageId=envelope.id,
            durationMs=round(elapsed * 1000, 1),
        )

    async def _presence(self, client: Client, channel: str, event_name: str) -> None:
        await self.sio.emit(
            "presence",
            {"eventName": event_name, "channel": channel, "uuid": client.uuid},
            room=protocol.presence_room(channel),
            namespace="/" + client.app,
        )

    # -- protection ---------------------------------------------------------------------

    async def watch_slow_consumers(self, interval: float = 0.5, full_every: int = 20) -> None:
        """Disconnect clients that stopped reading before their send queue grows unbounded.

        A client that does not read fills its TCP window; uvicorn then pauses writing and
        engine.io's per-socket queue grows with every message for it. Past
        ``max_queued_packets`` the client is cut off and its queue dropped.

        Only sockets that sent through engine.io's queue since the last look can have grown
        it (:data:`broadcast.queued_sockets`), so those are checked every ``interval``; all
        sockets (long-polling ones are not tracked) every ``full_every`` intervals. Looking
        at 10,000 idle sockets twice a second was most of an idle node's CPU.
        """
        limit = self.settings.max_queued_packets
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            rounds += 1
            if rounds % full_every == 0 or not self.settings.fast_broadcast:
                candidates = list(self.sio.eio.sockets.values())
            else:
                candidates = list(broadcast.queued_sockets)
            broadcast.queued_sockets.clear()
            for sock in candidates:
                queued = sock.queue.qsize()
                if sock.closed:
                    continue
                if queued <= limit:
                    if queued:  # still has a backlog: look again next time
                        broadcast.queued_sockets.add(sock)
                    continue
                log.warning("disconnecting slow consumer %s: %d packets queued (limit %d)",
                            sock.sid, queued, limit)
                metrics.SLOW_CONSUMERS.inc()
                await sock.close(wait=False, abort=True)
                while not sock.queue.empty():  # free what it never read
                    sock.queue.get_nowait()
                    sock.queue.task_done()

    async def drain(self, grace: float) -> None:
        """Graceful shutdown: refuse new work, finish in-flight messages, tell clients.

        After this, uvicorn closes the transports; clients see a transport close (not a
        server disconnect), so socket.io clients reconnect, to another node behind a balancer.
        """
        self.draining = True
        try:
            await asyncio.wait_for(self.pipeline.idle.wait(), grace)
        except TimeoutError:
            log.warning("shutting down with %d messages still in flight", self.pipeline.in_flight)
        notice = {"code": "server_shutdown", "message": "this node is shutting down; "
                  "reconnecting", "event": "shutdown"}
        for namespace in list(self.sio.manager.get_namespaces()):
            if namespace != "/":
                await self.sio.emit("error", notice, namespace=namespace, ignore_queue=True)
        # let the writers flush the notice (and any last delivery) before transports close
        queues = [sock.queue.join() for sock in list(self.sio.eio.sockets.values())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*queues), 1.0)

    # -- connection lifecycle ---------------------------------------------------------

    async def _on_connect(self, namespace: str, sid: str, environ: dict, auth: Any) -> None:
        app = namespace.lstrip("/")
        token = auth.get("jwt") if isinstance(auth, dict) else None
        try:
            claims = verify_token(self.settings.secrets_for(app), token, app=app)
        except AuthError as exc:
            log.info("refused connection to /%s: %s", app, exc)
            raise socketio.exceptions.ConnectionRefusedError(f"Authorization error: {exc}") from None
        count = self.connections_per_app.get(app, 0)
        if count >= self.settings.max_connections_per_app:
            log.warning("refused connection to /%s: %d connections (limit)", app, count)
            raise socketio.exceptions.ConnectionRefusedError(
                f"limit: app {app!r} has {count} connections on this node, the limit is "
                f"{self.settings.max_connections_per_app}; retry later or on another node")
        uuid = auth.get("uuid") if isinstance(auth, dict) else None
        if not isinstance(uuid, str) or not uuid or len(uuid) > 200:
            uuid = sid
        client = Client(app=app, uuid=uuid, admin=claims.admin, claims=claims)
        if self.settings.publish_rate > 0:
            client.bucket = TokenBucket(self.settings.publish_rate, self.settings.publish_burst)
        self.clients[sid] = client
        self.connections_per_app[app] = count + 1
        metrics.CONNECTIONS.labels(app).inc()
        if claims.admin:
            await self.sio.enter_room(sid, ADMIN_CHANNEL, namespace=namespace)
        await self.status(app, "connection", uuid=uuid, admin=claims.admin)

    async def _on_disconnect(self, namespace: str, sid: str, reason: Any = None) -> None:
        client = self.clients.pop(sid, None)
        if client is None:
            return
        self.connections_per_app[client.app] -= 1
        metrics.CONNECTIONS.labels(client.app).dec()
        for channel in client.channels:
            await self._presence(client, channel, "left")
        await self.status(client.app, "disconnection", uuid=client.uuid, admin=client.admin)

    # -- events -----------------------------------------------------------------------

    async def _on_event(self, event: str, namespace: str, sid: str, *args: Any) -> Any:
        client = self.clients.get(sid)
        if client is None:
            return None
        handler = self._handlers.get(event)
        data = args[0] if args else None
        if handler is None:
            error = ProtocolError(
                "unknown_event",
                f"unknown event {event[:60]!r}; expected subscribe, unsubscribe or publish",
            )
            return await self._refuse(sid, event, error, _request.get())
        if len(args) > 1:
            error = ProtocolError("bad_request", f"{event} takes one object argument")
            return await self._refuse(sid, event, error, _request.get())
        reply = await self._run(handler(self, sid, client, data), sid, event, _request.get())
        return self.sio.not_handled if reply is DEFERRED else reply

    async def _run(self, handling: Awaitable[Any], sid: str, event: str,
                   request: _Request) -> Any:
        """Await a handler; turn refusals and bugs into an error answer."""
        try:
            return await handling
        except ProtocolError as exc:
            return await self._refuse(sid, event, exc, request)
        except Exception as exc:  # a bug must still answer, and never take the node down
            log.exception("%s failed", event)
            error = ProtocolError(
                "internal", f"{event} failed on the server ({type(exc).__name__}); it was logged")
            return await self._refuse(sid, event, error, request)

    async def _refuse(self, sid: str, event: str, exc: ProtocolError,
                      request: _Request) -> dict[str, Any]:
        metrics.MESSAGES_REJECTED.labels(exc.code).inc()
        reply = protocol.error(exc.code, exc.message, **exc.details)
        if request.id is None:
            await self.sio.emit("error", {**reply["error"], "event": event[:60]}, to=sid,
                                namespace=request.namespace)
        return reply

    def _answer_later(self, handling: Awaitable[Any], sid: str, event: str) -> object:
        """Finish a slow request in its own task and send its ack from there."""
        request = _request.get()

        async def finish() -> None:
            reply = await self._run(handling, sid, event, request)
            if request.id is not None:
                await self.sio.answer(request, reply)

        task = asyncio.get_running_loop().create_task(finish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return DEFERRED

    async def _subscribe(self, sid: str, client: Client, data: Any) -> dict[str, Any]:
        request = protocol.parse_subscribe(data)
        if ADMIN_CHANNEL in request.channels and not client.admin:
            raise ProtocolError("forbidden", "only admin tokens may subscribe to 'admin'")
        for channel in request.channels:
            if channel == ADMIN_CHANNEL:
                continue
            if not client.claims.may("subscribe", channel):
                raise ProtocolError("forbidden", f"this token may not subscribe to {channel!r}")
            if request.with_presence and not client.claims.may("presence", channel):
                raise ProtocolError("forbidden", f"this token may not see presence on {channel!r}")
        total = len(client.channels | set(request.channels))
        if total > self.settings.max_channels_per_connection:
            raise ProtocolError(
                "limit",
                f"this would make {total} channels on one connection; the limit is "
                f"{self.settings.max_channels_per_connection}",
            )
        namespace = "/" + client.app
        for channel in request.channels:
            await self.sio.enter_room(sid, channel, namespace=namespace)
            if request.with_presence:
                await self.sio.enter_room(sid, protocol.presence_room(channel), namespace=namespace)
            new = channel not in client.channels
            client.channels.add(channel)
            if new and channel != ADMIN_CHANNEL:
                await self._presence(client, channel, "joined")
        await self.status(client.app, "subscribe", uuid=client.uuid, channels=list(request.channels))
        return protocol.ok(channels=list(request.channels))

    async def _unsubscribe(self, sid: str, client: Client, data: Any) -> dict[str, Any]:
        channels = protocol.parse_unsubscribe(data)
        namespace = "/" + client.app
        for channel in channels:
            if channel == ADMIN_CHANNEL and client.admin:
                continue  # admins stay on their status feed, as in Ekko
            await self.sio.leave_room(sid, channel, namespace=namespace)
            await self.sio.leave_room(sid, protocol.presence_room(channel), namespace=namespace)
            if channel in client.channels:
                client.channels.discard(channel)
                await self._presence(client, channel, "left")
        await self.status(client.app, "unsubscribe", uuid=client.uuid, channels=list(channels))
        return protocol.ok(channels=list(channels))

    async def _publish(self, sid: str, client: Client, data: Any) -> Any:
        request = protocol.parse_publish(data, self.settings.max_message_bytes)
        if not client.claims.may("publish", request.channel):
            raise ProtocolError("forbidden", f"this token may not publish to {request.channel!r}")
        if self.draining:
            raise ProtocolError("server_shutdown", "this node is shutting down; publish again "
                                                   "after reconnecting")
        if client.bucket is not None:
            wait = client.bucket.take()
            if wait:
                retry_ms = max(1, round(wait * 1000))
                metrics.RATE_LIMITED.inc()
                raise ProtocolError(
                    "rate_limited",
                    f"over {self.settings.publish_rate:g} publishes/s (burst "
                    f"{self.settings.publish_burst}); retry in {retry_ms} ms",
                    retryAfterMs=retry_ms,
                )
        metrics.MESSAGES_PUBLISHED.inc(client.app)
        rule = self.pipeline.rule(client.app, request.channel)
        if self.pipeline.may_wait(client.app, request.channel, rule):
            # functions to run, or a predecessor still in flight: don't hold up this
            # connection's other events; publish order is kept by the pipeline's sequence
            return self._answer_later(self._deliver_publish(client, request, rule), sid, "publish")
        return await self._deliver_publish(client, request, rule)

    async def _deliver_publish(self, client: Client, request: protocol.PublishRequest,
                               rule: Rule) -> Any:
        try:
            outcome = await self.pipeline.publish(
                client.app, request.channel, request.message, client.uuid, rule
            )
        except Overloaded as exc:
            raise ProtocolError("overloaded", str(exc)) from None
        envelope = outcome.envelope
        if outcome.error is not None and outcome.dropped_by is None:
            raise ProtocolError(
                "function_error",
                f"not delivered: {outcome.error}",
                function=outcome.error.function,
                kind=outcome.error.kind,
                id=envelope.id,
            )
        return protocol.ok(
            id=envelope.id,
            seq=envelope.seq,
            ts=envelope.ts,
            delivered=outcome.delivered,
            **({"filteredBy": outcome.filtered_by} if outcome.filtered_by else {}),
            **({"droppedBy": outcome.dropped_by} if outcome.dropped_by else {}),
        )

    _handlers = {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "publish": _publish,
    }

"""Echo's realtime policy: who may connect, subscribe and publish, and what they are sent.

This is the :class:`echo.transport.base.Handler` the wire calls. Each app is the namespace
``/<appName>`` (as in Ekko). Requests with an ack are answered ``{ok: true, ...}`` or
``{ok: false, error: {code, message}}``; a client that passed no callback (Ekko's own) gets
refusals as an ``error`` event instead, so nothing fails silently.

Rooms are local to this node (the transport keeps them); the broker carries frames between
nodes, and this node subscribes to a channel only while it has subscribers to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from echo.broker.base import Broker
from echo.config import Settings
from echo.core import metrics, protocol
from echo.core.associations import Rule
from echo.core.auth import AuthError, Claims, verify_token
from echo.core.limits import ConnectionCounts, TokenBucket
from echo.core.pipeline import Envelope, Overloaded, Pipeline
from echo.core.protocol import ADMIN_CHANNEL, ErrorCode, ProtocolError
from echo.core.runners import FunctionError
from echo.transport.base import Connection, Frame, Refused, Transport

log = logging.getLogger("echo.realtime")

MAX_UUID_LENGTH = 200


@dataclass(slots=True)
class Client:
    """What this node knows of one connection (``Connection.state``)."""

    app: str
    uuid: str
    admin: bool
    claims: Claims
    channels: set[str] = field(default_factory=set)
    bucket: TokenBucket | None = None


class Rooms:
    """Joins and leaves rooms on the transport, keeping this node's broker subscriptions in
    step: subscribed while a room has a local member, and a join answered only once the
    node receives the channel's frames from every node."""

    def __init__(self, transport: Transport, broker: Broker) -> None:
        self.transport = transport
        self.broker = broker
        self._subscribing: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def join(self, conn: Connection, room: str) -> None:
        key = (conn.app, room)
        if self.transport.join(conn, room):
            done = self._subscribing[key] = asyncio.get_running_loop().create_future()
            try:
                await self.broker.subscribe(conn.app, room)
            finally:
                if self._subscribing.get(key) is done:
                    del self._subscribing[key]
                done.set_result(None)
        elif (pending := self._subscribing.get(key)) is not None:
            await asyncio.shield(pending)

    async def leave(self, conn: Connection, room: str) -> None:
        if room in conn.rooms and self.transport.leave(conn, room):
            await self.broker.unsubscribe(conn.app, room)


@dataclass(slots=True)
class Request:
    """One event from a client, and where its answer goes (``ack_id`` None: no ack wanted)."""

    conn: Connection
    client: Client
    event: str
    ack_id: int | None


Handling = Callable[["Realtime", Request, Any], Coroutine[Any, Any, Any]]

DEFERRED = object()
"""A handler's return value meaning: the answer will be sent later, from a task."""


class Realtime:
    """The per-connection policy of this node (the transport's Handler)."""

    def __init__(self, settings: Settings, broker: Broker,
                 make_pipeline: Callable[[Realtime], Pipeline]) -> None:
        self.settings = settings
        self.broker = broker
        self.connections = ConnectionCounts(settings.max_connections_per_app)
        self.draining = False
        self._background: set[asyncio.Task[None]] = set()
        self.pipeline = make_pipeline(self)
        self._transport: Transport | None = None
        self._rooms: Rooms | None = None

    def attach(self, transport: Transport) -> None:
        """The transport this node serves on (it is built with this handler)."""
        self._transport = transport
        self._rooms = Rooms(transport, self.broker)

    @property
    def transport(self) -> Transport:
        assert self._transport is not None, "Realtime.attach(transport) first"
        return self._transport

    @property
    def rooms(self) -> Rooms:
        assert self._rooms is not None, "Realtime.attach(transport) first"
        return self._rooms

    # -- delivery ---------------------------------------------------------------------

    async def deliver(self, envelope: Envelope) -> None:
        """The pipeline's last step: one frame, to the channel's subscribers on every node."""
        payload = {
            "channel": envelope.channel,
            "message": envelope.message,
            "uuid": envelope.uuid,
            "id": envelope.id,
            "seq": envelope.seq,
            "ts": envelope.ts,
        }
        metrics.MESSAGES_DELIVERED.inc(envelope.app)
        self.broker.publish(envelope.app, envelope.channel,
                            Frame.event("/" + envelope.app, "message", payload))

    def write_local(self, app: str, room: str, frame: Frame) -> None:
        """The broker's delivery: a frame for a room of this node."""
        self.transport.write("/" + app, room, frame)

    def status(self, app: str, event: str, *, local: bool = False, **details: Any) -> None:
        """Tell the app's admin sockets what happened (``local``: on this node only)."""
        frame = Frame.event("/" + app, "status", protocol.status_payload(event, app, **details))
        if local:
            self.write_local(app, ADMIN_CHANNEL, frame)
        else:
            self.broker.publish(app, ADMIN_CHANNEL, frame)

    async def report_function_error(
        self, envelope: Envelope, error: FunctionError, elapsed: float
    ) -> None:
        log.warning("%s/%s: %s", envelope.app[:80], envelope.channel, error)
        self.status(
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

    def _presence(self, client: Client, channel: str, event_name: str) -> None:
        frame = Frame.event("/" + client.app, "presence",
                            {"eventName": event_name, "channel": channel, "uuid": client.uuid})
        self.broker.publish(client.app, protocol.presence_room(channel), frame)

    # -- connection lifecycle (the transport's Handler) ---------------------------------

    async def connect(self, conn: Connection, auth: Any) -> None:
        app = conn.app
        token = auth.get("jwt") if isinstance(auth, dict) else None
        try:
            claims = verify_token(self.settings.secrets_for(app), token, app=app)
        except AuthError as exc:
            log.info("refused connection to /%s: %s", app[:80], exc)
            raise Refused(f"Authorization error: {exc}") from None
        problem = self.connections.problem(app)
        if problem is not None:
            log.warning("refused connection to /%s: %s", app[:80], problem)
            raise Refused(problem)
        uuid = auth.get("uuid") if isinstance(auth, dict) else None
        if not isinstance(uuid, str) or not uuid or len(uuid) > MAX_UUID_LENGTH:
            uuid = conn.sid
        client = Client(app=app, uuid=uuid, admin=claims.admin, claims=claims)
        if self.settings.publish_rate > 0:
            client.bucket = TokenBucket(self.settings.publish_rate, self.settings.publish_burst)
        conn.state = client
        self.connections.add(app)
        metrics.labelled(metrics.CONNECTIONS, app).inc()
        try:
            if claims.admin:
                await self.rooms.join(conn, ADMIN_CHANNEL)
            self.status(app, "connection", uuid=uuid, admin=claims.admin)
        except BaseException:  # refused after all: disconnect() will never be called for it
            await self._forget(conn, client)
            raise

    async def _forget(self, conn: Connection, client: Client) -> None:
        """Undo what connect() counted and joined."""
        conn.state = None
        self.connections.remove(client.app)
        metrics.labelled(metrics.CONNECTIONS, client.app).dec()
        for room in list(conn.rooms):
            await self.rooms.leave(conn, room)

    async def disconnect(self, conn: Connection, reason: str) -> None:
        client = conn.state
        if not isinstance(client, Client):
            return
        for channel in client.channels - {ADMIN_CHANNEL}:  # the status feed has no presence
            self._presence(client, channel, "left")
            await self.broker.presence_remove(client.app, channel, conn.sid)
        await self._forget(conn, client)
        self.status(client.app, "disconnection", uuid=client.uuid, admin=client.admin)

    async def event(self, conn: Connection, event: str, args: list[Any],
                    ack_id: int | None) -> None:
        client = conn.state
        if not isinstance(client, Client):
            return
        request = Request(conn, client, event, ack_id)
        handler = self._handlers.get(event)
        if handler is None:
            error = ProtocolError(
                ErrorCode.UNKNOWN_EVENT,
                f"unknown event {event[:60]!r}; expected subscribe, unsubscribe or publish",
            )
            self._answer(request, self._refusal(request, error))
            return
        if len(args) > 1:
            error = ProtocolError(ErrorCode.BAD_REQUEST,
                                  f"{event[:60]} takes one object argument")
            self._answer(request, self._refusal(request, error))
            return
        data = args[0] if args else None
        reply = await self._run(handler(self, request, data), request)
        if reply is not DEFERRED:
            self._answer(request, reply)

    # -- answering ------------------------------------------------------------------------

    @staticmethod
    def _answer(request: Request, reply: Any) -> None:
        if request.ack_id is not None:
            request.conn.ack(request.ack_id, reply)

    async def _run(self, handling: Awaitable[Any], request: Request) -> Any:
        """Await a handler; turn refusals and bugs into an error answer."""
        try:
            return await handling
        except ProtocolError as exc:
            return self._refusal(request, exc)
        except Exception as exc:  # a bug must still answer, and never take the node down
            log.exception("%s failed", request.event[:60])
            error = ProtocolError(
                ErrorCode.INTERNAL,
                f"{request.event[:60]} failed on the server ({type(exc).__name__}); it was logged")
            return self._refusal(request, error)

    @staticmethod
    def _refusal(request: Request, exc: ProtocolError) -> dict[str, Any]:
        metrics.labelled(metrics.MESSAGES_REJECTED, str(exc.code)).inc()
        reply = protocol.error(exc.code, exc.message, **exc.details)
        if request.ack_id is None:  # Ekko's client passes no callback: tell it with an event
            request.conn.emit("error", {**reply["error"], "event": request.event[:60]})
        return reply

    def _answer_later(self, handling: Awaitable[Any], request: Request) -> object:
        """Finish a slow request in its own task and send its ack from there."""

        async def finish() -> None:
            reply = await self._run(handling, request)
            self._answer(request, reply)

        task = asyncio.get_running_loop().create_task(finish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return DEFERRED

    # -- events -----------------------------------------------------------------------

    async def _subscribe(self, request: Request, data: Any) -> dict[str, Any]:
        conn, client = request.conn, request.client
        subscription = protocol.parse_subscribe(data)
        if ADMIN_CHANNEL in subscription.channels and not client.admin:
            raise ProtocolError(ErrorCode.FORBIDDEN, "only admin tokens may subscribe to 'admin'")
        for channel in subscription.channels:
            if channel == ADMIN_CHANNEL:
                continue
            if not client.claims.may("subscribe", channel):
                raise ProtocolError(ErrorCode.FORBIDDEN,
                                    f"this token may not subscribe to {channel!r}")
            if subscription.with_presence and not client.claims.may("presence", channel):
                raise ProtocolError(ErrorCode.FORBIDDEN,
                                    f"this token may not see presence on {channel!r}")
        total = len(client.channels | set(subscription.channels))
        if total > self.settings.max_channels_per_connection:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"this would make {total} channels on one connection; the limit is "
                f"{self.settings.max_channels_per_connection}",
            )
        for channel in subscription.channels:
            if not conn.connected:  # it left while an earlier channel was being joined
                break
            await self.rooms.join(conn, channel)
            if subscription.with_presence:
                await self.rooms.join(conn, protocol.presence_room(channel))
            if channel not in client.channels:
                client.channels.add(channel)
                if channel != ADMIN_CHANNEL:
                    await self.broker.presence_add(client.app, channel, conn.sid,
                                                   {"uuid": client.uuid})
                    self._presence(client, channel, "joined")
        self.status(client.app, "subscribe", uuid=client.uuid, channels=list(subscription.channels))
        return protocol.ok(channels=list(subscription.channels))

    async def _unsubscribe(self, request: Request, data: Any) -> dict[str, Any]:
        conn, client = request.conn, request.client
        channels = protocol.parse_unsubscribe(data)
        for channel in channels:
            if channel == ADMIN_CHANNEL and client.admin:
                continue  # admins stay on their status feed, as in Ekko
            await self.rooms.leave(conn, channel)
            await self.rooms.leave(conn, protocol.presence_room(channel))
            if channel in client.channels:
                client.channels.discard(channel)
                await self.broker.presence_remove(client.app, channel, conn.sid)
                self._presence(client, channel, "left")
        self.status(client.app, "unsubscribe", uuid=client.uuid, channels=list(channels))
        return protocol.ok(channels=list(channels))

    async def _publish(self, request: Request, data: Any) -> Any:
        client = request.client
        publish = protocol.parse_publish(data, self.settings.max_message_bytes)
        if not client.claims.may("publish", publish.channel):
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"this token may not publish to {publish.channel!r}")
        if self.draining:
            raise ProtocolError(ErrorCode.SERVER_SHUTDOWN,
                                "this node is shutting down; publish again after reconnecting")
        if client.bucket is not None:
            wait = client.bucket.take()
            if wait:
                retry_ms = max(1, round(wait * 1000))
                metrics.RATE_LIMITED.inc()
                raise ProtocolError(
                    ErrorCode.RATE_LIMITED,
                    f"over {self.settings.publish_rate:g} publishes/s (burst "
                    f"{self.settings.publish_burst}); retry in {retry_ms} ms",
                    retryAfterMs=retry_ms,
                )
        metrics.MESSAGES_PUBLISHED.inc(client.app)
        rule = self.pipeline.rule(client.app, publish.channel)
        if self.pipeline.may_wait(client.app, publish.channel, rule):
            # functions to run, or a predecessor still in flight: don't hold up this
            # connection's other events; publish order is kept by the pipeline's sequence
            return self._answer_later(self._deliver_publish(client, publish, rule), request)
        return await self._deliver_publish(client, publish, rule)

    async def _deliver_publish(self, client: Client, request: protocol.PublishRequest,
                               rule: Rule) -> Any:
        try:
            outcome = await self.pipeline.publish(
                client.app, request.channel, request.message, client.uuid, rule
            )
        except Overloaded as exc:
            raise ProtocolError(ErrorCode.OVERLOADED, str(exc)) from None
        envelope = outcome.envelope
        if outcome.error is not None and outcome.dropped_by is None:
            raise ProtocolError(
                ErrorCode.FUNCTION_ERROR,
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

    _handlers: dict[str, Handling] = {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "publish": _publish,
    }

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
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from echo.broker.base import Broker, HistoryPolicy, Position
from echo.config import Settings
from echo.core import metrics, protocol
from echo.core.associations import HistorySpec, Rule
from echo.core.auth import AuthError, Claims, verify_token
from echo.core.envelope import refuse_plaintext
from echo.core.limits import ConnectionCounts, TokenBucket
from echo.core.pipeline import Envelope, Overloaded, Pipeline
from echo.core.protocol import ADMIN_CHANNEL, ErrorCode, ProtocolError
from echo.core.runners import FunctionError
from echo.core.webhooks import Webhooks
from echo.transport.base import Connection, Frame, Refused, Transport

log = logging.getLogger("echo.realtime")

MAX_UUID_LENGTH = 200
CONTROL_ROOM = "\x00orders"
"""Every connection's room for the backend's orders (disconnect, unsubscribe a user): not a
channel name, so no client can join or publish to it; its frames are read, never written."""
IN_FLIGHT_WAIT = 5.0
"""Seconds a publish waits for an earlier one with the same idempotencyKey to settle."""


@dataclass(slots=True)
class Client:
    """What this node knows of one connection (``Connection.state``)."""

    app: str
    uuid: str
    admin: bool
    claims: Claims
    channels: set[str] = field(default_factory=set)
    announced: set[str] = field(default_factory=set)
    """Channels it joined ``withPresence``: only these announce its joins and leaves."""
    bucket: TokenBucket | None = None


def spend(bucket: TokenBucket | None, what: str) -> None:
    """Take one token of a rate limit, or refuse with ``rate_limited`` and when to retry
    (``what``: the unit, e.g. ``publishes/s``)."""
    if bucket is None or not (wait := bucket.take()):
        return
    retry_ms = max(1, round(wait * 1000))
    metrics.RATE_LIMITED.inc()
    raise ProtocolError(ErrorCode.RATE_LIMITED, f"over {bucket.rate:g} {what} (burst "
                        f"{bucket.burst}); retry in {retry_ms} ms", retryAfterMs=retry_ms)


def foreign_personal(client: Client, channel: str) -> bool:
    """``channel`` is another user's personal channel (admins see them all)."""
    owner = protocol.personal_owner(channel)
    return owner is not None and owner != client.claims.user and not client.admin


FENCE_SECONDS = 0.5
"""How long a recovered connection waits, at most, for frames numbered before its history
read that are still on their way from the backend (see :meth:`Rooms.release`)."""


@dataclass(slots=True)
class Held:
    """A connection being recovered on one room: the frames kept for it while its history is
    read, then (``fence``) the offset at or below which arriving frames are already written."""

    kept: list[Frame] = field(default_factory=list)
    fence: int | None = None


class Rooms:
    """Joins and leaves rooms on the transport, keeping this node's broker subscriptions in
    step: subscribed while a room has a local member (or a connection held for recovery),
    and a join answered only once the node receives the channel's frames from every node.

    A held connection (:meth:`hold`) is not in its room yet: what the room is sent meanwhile
    is kept for it, so a recovery can write the missed messages first, then these, in order.
    """

    def __init__(self, transport: Transport, broker: Broker) -> None:
        self.transport = transport
        self.broker = broker
        self._subscribing: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.holding: dict[tuple[str, str], dict[Connection, Held]] = {}
        """Per (app, room): the connections held for recovery, and what is kept for each."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def join(self, conn: Connection, room: str) -> None:
        await self._subscribed(conn, room, first=self.transport.join(conn, room))

    async def _subscribed(self, conn: Connection, room: str, *, first: bool) -> None:
        key = (conn.app, room)
        if first:
            done = self._subscribing[key] = asyncio.get_running_loop().create_future()
            try:
                await self.broker.subscribe(conn.app, room)
            finally:
                if self._subscribing.get(key) is done:
                    del self._subscribing[key]
                done.set_result(None)
        elif (pending := self._subscribing.get(key)) is not None:
            await asyncio.shield(pending)

    async def hold(self, conn: Connection, room: str) -> None:
        """Receive the room's frames for ``conn`` without writing them (see :meth:`release`)."""
        holders = self.holding.setdefault((conn.app, room), {})
        first = not holders and not self.transport.has_members(conn.namespace, room)
        holders[conn] = Held()
        try:
            await self._subscribed(conn, room, first=first)
        except BaseException:
            await self.leave(conn, room)
            raise

    async def release(self, conn: Connection, room: str, before: list[Frame], after: int) -> int:
        """Write ``before``, then what was kept for ``conn`` with an offset above ``after``,
        then let the room's frames through: nothing is missed or doubled in between.

        Across nodes a frame numbered at or below ``after`` may still be on its way from
        the backend when the history was read; so the connection stays fenced (frames at
        or below ``after`` dropped, later ones written) until the first later frame arrives
        or :data:`FENCE_SECONDS` pass, and only then joins the room.
        Returns how many frames were written (0 if it left meanwhile)."""
        key = (conn.app, room)
        holders = self.holding.get(key)
        held = holders.get(conn) if holders is not None else None
        if held is None or held.fence is not None:
            return 0
        if not conn.connected:
            await self.leave(conn, room)
            return 0
        written = 0
        for frame in before:
            conn.write(frame)
            written += 1
        held.fence = after
        for frame in held.kept:
            if frame.offset is None or frame.offset > after:
                conn.write(frame)
                written += 1
                if frame.offset is not None:
                    held.fence = None
        held.kept = []
        if held.fence is None or not self.broker.remote:
            self._join_held(key, conn)
        else:
            asyncio.get_running_loop().call_later(FENCE_SECONDS, self._end_fence, key, conn, held)
        return written

    def _join_held(self, key: tuple[str, str], conn: Connection) -> None:
        holders = self.holding[key]
        del holders[conn]
        if not holders:
            del self.holding[key]
        self.transport.join(conn, key[1])

    def _end_fence(self, key: tuple[str, str], conn: Connection, held: Held) -> None:
        holders = self.holding.get(key)
        if holders is None or holders.get(conn) is not held:
            return  # it left, or joined at a later frame
        if conn.connected:
            self._join_held(key, conn)
        else:
            task = asyncio.get_running_loop().create_task(self.leave(conn, key[1]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def keep(self, app: str, room: str, frame: Frame) -> None:
        key = (app, room)
        holders = self.holding.get(key)
        if not holders:
            return
        for conn, held in list(holders.items()):
            if held.fence is None:
                held.kept.append(frame)
            elif frame.offset is None or frame.offset > held.fence:
                conn.write(frame)
                if frame.offset is not None:  # a later one: nothing older can follow it
                    self._join_held(key, conn)

    async def leave(self, conn: Connection, room: str) -> None:
        key = (conn.app, room)
        holders = self.holding.get(key)
        if holders is not None and conn in holders:
            del holders[conn]
            if not holders:
                del self.holding[key]
            if not holders and not self.transport.has_members(conn.namespace, room):
                await self.broker.unsubscribe(conn.app, room)
            return
        if room in conn.rooms and self.transport.leave(conn, room) and not self.holding.get(key):
            await self.broker.unsubscribe(conn.app, room)

    def held_rooms(self, conn: Connection) -> list[str]:
        return [room for (app, room), holders in self.holding.items()
                if app == conn.app and conn in holders]


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
        self.webhooks: Webhooks | None = None
        """Where this node's events go to the apps' backends (set by the server)."""
        self.pipeline = make_pipeline(self)
        self._transport: Transport | None = None
        self._rooms: Rooms | None = None
        self._policies: dict[HistorySpec, HistoryPolicy] = {}

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
        hooked = self.webhooks is not None and self.webhooks.wants(envelope.app, "publish")
        rule = envelope.rule or self.pipeline.rule(envelope.app, envelope.channel)
        policy = self.history_policy(rule)
        if policy is None:
            self.broker.publish(envelope.app, envelope.channel,
                                Frame.event("/" + envelope.app, "message", payload))
            if hooked:
                self._publish_webhook(envelope)
            return
        # the broker numbers it: the packet up to the offset, which it completes
        head = Frame.event("/" + envelope.app, "message", payload).text[:-2] + ',"offset":'
        envelope.position = self.broker.publish_history(envelope.app, envelope.channel, head,
                                                        policy)
        metrics.HISTORY_APPENDED.inc(envelope.app)
        if hooked:  # only once it is kept: a refused write is not delivered, nor announced
            envelope.position.add_done_callback(
                lambda done: None if done.cancelled() or done.exception() is not None
                else self._publish_webhook(envelope, done.result().offset))

    def _publish_webhook(self, envelope: Envelope, offset: int | None = None) -> None:
        assert self.webhooks is not None
        self.webhooks.emit(envelope.app, "publish", {
            "channel": envelope.channel, "message": envelope.message, "uuid": envelope.uuid,
            "messageId": envelope.id, "seq": envelope.seq,
            **({"offset": offset} if offset is not None else {})})

    def history_policy(self, rule: Rule) -> HistoryPolicy | None:
        """A rule's history with the settings' defaults filled in (None: not kept)."""
        spec = rule.history
        if spec is None:
            return None
        settings = self.settings
        policy = self._policies.get(spec)
        if policy is None:
            policy = self._policies[spec] = HistoryPolicy(
                size=spec.size or settings.history_size,
                ttl=spec.ttl or settings.history_ttl,
                meta_ttl=settings.history_meta_ttl)
        return policy

    def write_local(self, app: str, room: str, frame: Frame) -> None:
        """The broker's delivery: a frame for a room of this node."""
        if room == CONTROL_ROOM:
            self._obey(app, frame)
            return
        self.transport.write("/" + app, room, frame)
        if self.rooms.holding:  # connections being recovered get it after what they missed
            self.rooms.keep(app, room, frame)

    def status(self, app: str, event: str, *, local: bool = False, **details: Any) -> None:
        """Tell the app's admin sockets what happened (``local``: on this node only), and
        its webhooks that want this event."""
        if self.webhooks is not None and self.webhooks.wants(app, event):
            self.webhooks.emit(app, event, details)
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

    async def _occupancy(self, app: str, channel: str) -> None:
        """After a join or leave: ``channel_occupied`` (its first subscriber, on any node) or
        ``channel_vacated`` (its last left) for the webhooks that want them; the broker says
        whether this change turned the channel, once across the cluster. Awaited before the
        subscribe or unsubscribe is answered (for apps with such webhooks only): a join that
        was acknowledged is counted everywhere, so another node's leave cannot see an empty
        channel that is not."""
        hooks = self.webhooks
        if hooks is None or not (hooks.wants(app, "channel_occupied")
                                 or hooks.wants(app, "channel_vacated")):
            return
        try:
            turned = await self.broker.occupancy_change(app, channel)
        except Exception as exc:
            log.warning("%s/%s: occupancy not checked: %s", app[:80], channel, exc)
            return
        if turned is None:
            return
        event = "channel_occupied" if turned else "channel_vacated"
        if hooks.wants(app, event):
            hooks.emit(app, event, {"channel": channel})

    def _presence(self, client: Client, channel: str, event_name: str) -> None:
        """Announce a join or leave of a ``withPresence`` subscriber, as Ekko did: to the
        channel's presence subscribers and, as a status, to the app's admins. A plain
        subscriber is not announced (it is still counted in presence requests)."""
        if channel not in client.announced:
            return
        if event_name == "left":
            client.announced.discard(channel)
        if self.pipeline.rule(client.app, channel).presence_counts_only:
            return  # a big channel: no join/leave storm, the count is asked for
        frame = Frame.event("/" + client.app, "presence", {
            "eventName": event_name, "channel": channel,
            "presenceChannel": protocol.ekko_presence_channel(channel), "uuid": client.uuid})
        self.broker.publish(client.app, protocol.presence_room(channel), frame)
        self.status(client.app, event_name, uuid=client.uuid, admin=client.admin, channel=channel)

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
        if claims.user is not None:  # the token vouches for a user: the uuid is that user
            if uuid not in (None, "", claims.user):
                log.info("refused connection to /%s: uuid does not match the token", app[:80])
                raise Refused("Authorization error: the uuid does not match the token's user "
                              "(leave uuid out, or send the token's)")
            uuid = claims.user
        elif not isinstance(uuid, str) or not uuid or len(uuid) > MAX_UUID_LENGTH:
            uuid = "anon-" + secrets.token_urlsafe(12)  # never the sid: that is the session's
        client = Client(app=app, uuid=uuid, admin=claims.admin, claims=claims)
        client.bucket = self.publish_bucket(backend=claims.admin)
        conn.state = client
        self.connections.add(app)
        metrics.labelled(metrics.CONNECTIONS, app).inc()
        try:
            await self.rooms.join(conn, CONTROL_ROOM)  # the backend's orders reach this node
            # said before an admin joins its feed: no event may precede the CONNECT reply
            self.status(app, "connection", uuid=uuid, admin=claims.admin)
            if claims.admin:
                await self.rooms.join(conn, ADMIN_CHANNEL)
        except BaseException:  # refused after all: disconnect() will never be called for it
            await self._forget(conn, client)
            raise

    async def _forget(self, conn: Connection, client: Client) -> None:
        """Undo what connect() counted and joined."""
        conn.state = None
        self.connections.remove(client.app)
        metrics.labelled(metrics.CONNECTIONS, client.app).dec()
        for room in [*conn.rooms, *self.rooms.held_rooms(conn)]:
            await self.rooms.leave(conn, room)

    async def disconnect(self, conn: Connection, reason: str) -> None:
        client = conn.state
        if not isinstance(client, Client):
            return
        for channel in client.channels - {ADMIN_CHANNEL}:  # the status feed has no presence
            # gone from presence before "left" is said: whoever asks on hearing it agrees
            await self.broker.presence_remove(client.app, channel, conn.sid)
            await self._occupancy(client.app, channel)
            self._presence(client, channel, "left")
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
                f"unknown event {event[:60]!r}; expected subscribe, unsubscribe, publish, history "
                "or presence",
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

        self._spawn(finish())
        return DEFERRED

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task this node keeps a reference to until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- events -----------------------------------------------------------------------

    async def _subscribe(self, request: Request, data: Any) -> dict[str, Any]:
        conn, client = request.conn, request.client
        subscription = protocol.parse_subscribe(data)
        refused = {channel: why for channel in subscription.channels
                   if (why := self._may_not_subscribe(client, channel, subscription.with_presence))}
        if refused and len(refused) == len(subscription.channels):
            first = next(iter(refused.values()))
            raise ProtocolError(ErrorCode.FORBIDDEN, first)
        if refused:  # the rest are joined, as in Ekko; the ack says which were not and why
            subscription = replace(subscription, channels=tuple(
                c for c in subscription.channels if c not in refused))
        total = len(client.channels | set(subscription.channels))
        if total > self.settings.max_channels_per_connection:
            raise ProtocolError(
                ErrorCode.LIMIT,
                f"this would make {total} channels on one connection; the limit is "
                f"{self.settings.max_channels_per_connection}",
            )
        positions: dict[str, dict[str, Any]] = {}
        recovered: dict[str, bool] = {}
        for channel in subscription.channels:
            if not conn.connected:  # it left while an earlier channel was being joined
                break
            policy = None if channel == ADMIN_CHANNEL else self.history_policy(
                self.pipeline.rule(client.app, channel))
            since = subscription.since.get(channel)
            if policy is not None and since is not None and channel in conn.rooms:
                # already live on this connection: nothing was missed, nothing is sent again
                position = await self._position(client.app, channel, policy)
                recovered[channel] = position is not None and position.epoch == since.epoch
            elif policy is not None and since is not None:
                recovered[channel], position = await self._recover(conn, channel, since, policy)
            else:
                if since is not None:
                    recovered[channel] = False  # nothing is kept for it: nothing to recover
                await self.rooms.join(conn, channel)
                position = await self._position(client.app, channel, policy) if policy else None
            if position is not None:
                positions[channel] = {"offset": position.offset, "epoch": position.epoch}
                self._new_epoch(client.app, channel, position)
            announce = subscription.with_presence and channel not in client.announced \
                and channel != ADMIN_CHANNEL
            if subscription.with_presence:
                await self.rooms.join(conn, protocol.presence_room(channel))
                if announce:
                    client.announced.add(channel)
            if channel not in client.channels:
                client.channels.add(channel)
                if channel != ADMIN_CHANNEL:
                    await self.broker.presence_add(client.app, channel, conn.sid,
                                                   {"uuid": client.uuid})
                    await self._occupancy(client.app, channel)
            if announce:
                self._presence(client, channel, "joined")
        self.status(client.app, "subscribe", uuid=client.uuid, admin=client.admin,
                    channels=list(subscription.channels))
        return protocol.ok(channels=list(subscription.channels),
                           **({"positions": positions} if positions else {}),
                           **({"recovered": recovered} if subscription.since else {}),
                           **({"refused": {c: {"code": ErrorCode.FORBIDDEN, "message": why}
                                           for c, why in refused.items()}} if refused else {}))

    def _may_not_subscribe(self, client: Client, channel: str, with_presence: bool) -> str | None:
        """Why this connection may not join ``channel``, or None."""
        if channel == ADMIN_CHANNEL:
            return None if client.admin else "only admin tokens may subscribe to 'admin'"
        if not client.claims.may("subscribe", channel):
            return f"this token may not subscribe to {channel!r}"
        if foreign_personal(client, channel):
            return (f"{channel!r} is a personal channel: only a token whose uuid claim is "
                    "that user may subscribe")
        if with_presence and not client.claims.may("presence", channel):
            return f"this token may not see presence on {channel!r}"
        return None

    def publish_bucket(self, *, backend: bool) -> TokenBucket | None:
        """The publish rate limit of a browser connection, or of an app's backend (admin
        tokens, the HTTP server API); None when the setting is 0 (no limit)."""
        settings = self.settings
        rate, burst = ((settings.backend_publish_rate, settings.backend_publish_burst) if backend
                       else (settings.publish_rate, settings.publish_burst))
        return TokenBucket(rate, burst) if rate > 0 else None

    def _new_epoch(self, app: str, channel: str, position: Position) -> None:
        """Tell the app's admins when a stream started a new life (its data was lost, or it
        is new): positions from before it cannot be recovered."""
        if position.fresh:
            metrics.EPOCHS_STARTED.inc()
            self.status(app, "history_epoch", channel=channel, epoch=position.epoch,
                        offset=position.offset)

    async def _position(self, app: str, channel: str, policy: HistoryPolicy) -> Position | None:
        """Where a history channel is now (after the join: nothing after it is missed)."""
        try:
            return (await self.broker.history(app, channel, policy, limit=1, reverse=True)).position
        except Exception as exc:
            log.warning("%s/%s: history position unavailable: %s", app[:80], channel, exc)
            return None

    async def _recover(self, conn: Connection, channel: str, since: protocol.Since,
                       policy: HistoryPolicy) -> tuple[bool, Position | None]:
        """Join ``channel`` from ``since``: what was missed first, in order, then live, with
        no gap and no duplicate; False when that cannot be promised (the epoch changed, or
        messages were trimmed or expired): the client then reloads its state."""
        await self.rooms.hold(conn, channel)
        try:
            read = await self.broker.history(conn.app, channel, policy, since=since.offset,
                                             limit=policy.size + 1)
        except Exception as exc:
            log.warning("%s/%s: recovery unavailable (%s): joining live", conn.app[:80], channel, exc)
            await self.rooms.release(conn, channel, [], -1)
            metrics.labelled(metrics.RECOVERIES, "not_recovered").inc()
            return False, None
        position, frames = read.position, read.frames
        missed = position.offset - since.offset
        complete = (position.epoch == since.epoch and not read.expired and missed >= 0
                    and len(frames) == missed
                    and (not frames or frames[0].offset == since.offset + 1))
        await self.rooms.release(conn, channel, frames if complete else [], position.offset)
        metrics.labelled(metrics.RECOVERIES, "recovered" if complete else "not_recovered").inc()
        if complete:
            metrics.RECOVERED_MESSAGES.inc(len(frames))
        return complete, position

    async def _unsubscribe(self, request: Request, data: Any) -> dict[str, Any]:
        channels = protocol.parse_unsubscribe(data)
        await self._leave_channels(request.conn, request.client, channels)
        return protocol.ok(channels=list(channels))

    async def _leave_channels(self, conn: Connection, client: Client,
                              channels: tuple[str, ...]) -> None:
        for channel in channels:
            if channel == ADMIN_CHANNEL and client.admin:
                continue  # admins stay on their status feed, as in Ekko
            await self.rooms.leave(conn, channel)
            await self.rooms.leave(conn, protocol.presence_room(channel))
            if channel in client.channels:
                client.channels.discard(channel)
                await self.broker.presence_remove(client.app, channel, conn.sid)
                await self._occupancy(client.app, channel)
                self._presence(client, channel, "left")
        self.status(client.app, "unsubscribe", uuid=client.uuid, admin=client.admin,
                    channels=list(channels))

    # -- orders from the app's backend, to every node (the HTTP server API) ------------------

    def order(self, app: str, op: str, uuid: str, channel: str | None = None) -> None:
        """Ask every node serving ``app`` to disconnect ``uuid``'s connections, or to
        unsubscribe them from ``channel``."""
        self.broker.publish(app, CONTROL_ROOM, Frame.event(
            "/" + app, "order", {"op": op, "uuid": uuid, "channel": channel}))

    def _obey(self, app: str, frame: Frame) -> None:
        try:
            _, _, args = frame.decode()
            order = args[0]
            op, uuid, channel = order["op"], order["uuid"], order.get("channel")
        except (ValueError, LookupError, TypeError):
            log.warning("%s: an unreadable order from another node was ignored", app[:80])
            return
        targets = [conn for conn in self.transport.connections()
                   if conn.app == app and isinstance(conn.state, Client) and conn.state.uuid == uuid]
        for conn in targets:
            self._spawn(self._carry_out(conn, op, channel))

    async def _carry_out(self, conn: Connection, op: str, channel: str | None) -> None:
        client = conn.state
        if not isinstance(client, Client) or not conn.connected:
            return
        if op == "disconnect":
            await conn.close()
        elif op == "unsubscribe" and channel is not None and channel in client.channels:
            await self._leave_channels(conn, client, (channel,))
            conn.emit("unsubscribed", {"channel": channel, "reason": "server"})

    async def _publish(self, request: Request, data: Any) -> Any:
        client = request.client
        publish = protocol.parse_publish(data, self.settings.max_message_bytes)
        if not client.claims.may("publish", publish.channel):
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"this token may not publish to {publish.channel!r}")
        if self.draining:
            raise ProtocolError(ErrorCode.SERVER_SHUTDOWN,
                                "this node is shutting down; publish again after reconnecting")
        try:
            spend(client.bucket, "publishes/s")
        except ProtocolError as refused:  # cheap and fair: stop reading it until allowed again
            request.conn.throttle(refused.details.get("retryAfterMs", 0) / 1000)
            raise
        metrics.MESSAGES_PUBLISHED.inc(client.app)
        rule = self.pipeline.rule(client.app, publish.channel)
        if self.pipeline.may_wait(client.app, publish.channel, rule) or (self.broker.remote and (
                rule.history is not None or publish.idempotency_key is not None)):
            # functions to run, or a predecessor still in flight: don't hold up this
            # connection's other events; publish order is kept by the pipeline's sequence
            return self._answer_later(self.publish_as(client.app, client.uuid, publish, rule),
                                      request)
        return await self.publish_as(client.app, client.uuid, publish, rule)

    async def publish_as(self, app: str, uuid: str, request: protocol.PublishRequest,
                         rule: Rule | None = None) -> dict[str, Any]:
        """Publish through the channel's functions and answer with the ack (or raise a
        ProtocolError): the socket ``publish`` and the HTTP server API share it."""
        rule = rule if rule is not None else self.pipeline.rule(app, request.channel)
        if rule.encrypted:
            refuse_plaintext(request.channel, request.message)
        key = request.idempotency_key
        if key is None:
            return await self._publish_once(app, uuid, request, rule)
        window = self.settings.idempotency_window
        deadline = asyncio.get_running_loop().time() + IN_FLIGHT_WAIT
        while True:
            try:
                earlier = await self.broker.claim_idempotency(app, request.channel, key,
                                                              window)
            except Exception as exc:
                raise ProtocolError(ErrorCode.UNAVAILABLE, "not published: the idempotency key "
                                    f"could not be checked ({type(exc).__name__}); retry") from None
            if earlier != {}:
                break
            # the first publish with this key is still running: its ack is the answer (or, if
            # it fails, this one goes ahead)
            if asyncio.get_running_loop().time() >= deadline:
                raise ProtocolError(ErrorCode.UNAVAILABLE, "not published: a publish with this "
                                    "idempotencyKey is still in flight; retry")
            await asyncio.sleep(0.05)
        if earlier is not None:
            metrics.DUPLICATES_SUPPRESSED.inc()
            return protocol.ok(**{**earlier, "duplicate": True})
        try:
            reply = await self._publish_once(app, uuid, request, rule)
        except BaseException:  # not published: a retry with the same key may go ahead
            with contextlib.suppress(Exception):
                await self.broker.settle_idempotency(app, request.channel, key, None, window)
            raise
        try:
            await self.broker.settle_idempotency(
                app, request.channel, key, {k: v for k, v in reply.items() if k != "ok"}, window)
        except Exception as exc:
            log.warning("%s/%s: idempotency key not recorded: %s", app[:80], request.channel, exc)
        return reply

    async def _publish_once(self, app: str, uuid: str, request: protocol.PublishRequest,
                            rule: Rule) -> dict[str, Any]:
        try:
            outcome = await self.pipeline.publish(
                app, request.channel, request.message, uuid, rule
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
        where: dict[str, Any] = {}
        if envelope.position is not None:
            try:
                position = await envelope.position
            except Exception as exc:
                raise ProtocolError(ErrorCode.UNAVAILABLE,
                                    f"not delivered: the history stream could not be written ({exc})",
                                    id=envelope.id) from None
            where = {"offset": position.offset, "epoch": position.epoch}
            self._new_epoch(app, request.channel, position)
        return protocol.ok(
            id=envelope.id,
            seq=envelope.seq,
            ts=envelope.ts,
            delivered=outcome.delivered,
            **where,
            **({"filteredBy": outcome.filtered_by} if outcome.filtered_by else {}),
            **({"droppedBy": outcome.dropped_by} if outcome.dropped_by else {}),
        )

    async def _history(self, request: Request, data: Any) -> dict[str, Any]:
        client = request.client
        ask = protocol.parse_history(data)
        if (not client.claims.may("history", ask.channel) or ask.channel == ADMIN_CHANNEL
                or foreign_personal(client, ask.channel)):
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"this token may not read the history of {ask.channel!r}")
        spend(client.bucket, "requests/s")  # a read of 1,000 messages shares the publish budget
        return await self.read_history(client.app, ask)

    async def read_history(self, app: str, ask: protocol.HistoryRequest) -> dict[str, Any]:
        """A history channel's kept messages, as delivered (socket ``history`` and HTTP)."""
        policy = self.history_policy(self.pipeline.rule(app, ask.channel))
        if policy is None:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"channel {ask.channel!r} keeps no history: give its rule in "
                                'associations "history": true')
        try:
            read = await self.broker.history(app, ask.channel, policy, since=ask.since,
                                             limit=ask.limit, reverse=ask.reverse)
        except Exception as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE,
                                f"history unavailable ({type(exc).__name__}); retry") from None
        self._new_epoch(app, ask.channel, read.position)
        return protocol.ok(channel=ask.channel,
                           publications=[frame.decode()[2][0] for frame in read.frames],
                           offset=read.position.offset, epoch=read.position.epoch)

    async def _presence_request(self, request: Request, data: Any) -> dict[str, Any]:
        client = request.client
        channel = protocol.parse_presence(data)
        if not client.claims.may("presence", channel) or foreign_personal(client, channel):
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"this token may not see presence on {channel!r}")
        here = await self.presence_of(client.app, channel)
        if self.pipeline.rule(client.app, channel).presence_counts_only:
            return {key: value for key, value in here.items() if key != "clients"}
        return {**here, "clients": [{"uuid": c["uuid"]} for c in here["clients"]]}

    async def presence_of(self, app: str, channel: str) -> dict[str, Any]:
        """Who is subscribed to ``channel`` now, on every node (socket and HTTP)."""
        if channel == ADMIN_CHANNEL:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the admin channel has no presence")
        try:
            members = await self.broker.presence(app, channel)
        except Exception as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE,
                                f"presence unavailable ({type(exc).__name__}); retry") from None
        clients = sorted(({"connection": sid, "uuid": info.get("uuid")}
                          for sid, info in members.items()),
                         key=lambda c: (str(c["uuid"]), c["connection"]))
        return protocol.ok(channel=channel, count=len(clients), clients=clients)

    _handlers: dict[str, Handling] = {
        "subscribe": _subscribe,
        "unsubscribe": _unsubscribe,
        "publish": _publish,
        "history": _history,
        "presence": _presence_request,
    }

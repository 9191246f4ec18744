"""The Socket.IO side: connect/auth, subscribe, unsubscribe, publish, presence and status.

Each app is the namespace ``/<appName>`` (as in Ekko). Handlers answer an ack callback with
``{ok: true, ...}`` or ``{ok: false, error: {code, message}}``; a client that passed no
callback (Ekko's own) gets refusals as an ``error`` event instead, so nothing fails silently.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import socketio

from echo.config import Settings
from echo.core import metrics, protocol
from echo.core.auth import AuthError, verify_token
from echo.core.pipeline import Envelope, Overloaded, Pipeline
from echo.core.protocol import ADMIN_CHANNEL, ProtocolError
from echo.core.runners import FunctionError

log = logging.getLogger("echo.realtime")

_wants_ack: contextvars.ContextVar[bool] = contextvars.ContextVar("wants_ack", default=False)


class _AckAwareServer(socketio.AsyncServer):
    """Records whether the client asked for an ack, so refusals without one become events."""

    async def _handle_event_internal(self, server, sid, eio_sid, data, namespace, id):  # type: ignore[no-untyped-def]
        _wants_ack.set(id is not None)
        await super()._handle_event_internal(server, sid, eio_sid, data, namespace, id)


@dataclass
class Client:
    app: str
    uuid: str
    admin: bool
    channels: set[str] = field(default_factory=set)


def status_payload(event: str, app: str, **details: Any) -> dict[str, Any]:
    """A ``status`` event: Ekko's ``{message: {event, app, uuid, admin}}`` plus flat fields."""
    core = {
        "event": event,
        "app": app,
        "uuid": details.pop("uuid", None),
        "admin": details.pop("admin", False),
    }
    return {**core, **details, "ts": int(time.time() * 1000), "message": dict(core)}


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
        self.sio = _AckAwareServer(
            async_mode="asgi",
            namespaces="*",
            client_manager=client_manager,
            cors_allowed_origins=list(settings.cors_origins)
            if settings.cors_origins != ("*",)
            else "*",
            max_http_buffer_size=buffer,
            logger=False,
            engineio_logger=False,
        )
        self.clients: dict[str, Client] = {}
        self.pipeline = make_pipeline(self)
        self.sio.on("connect", self._on_connect, namespace="*")
        self.sio.on("disconnect", self._on_disconnect, namespace="*")
        self.sio.on("*", self._on_event, namespace="*")

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
        metrics.MESSAGES_DELIVERED.labels(envelope.app).inc()
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

    # -- connection lifecycle ---------------------------------------------------------

    async def _on_connect(self, namespace: str, sid: str, environ: dict, auth: Any) -> None:
        app = namespace.lstrip("/")
        token = auth.get("jwt") if isinstance(auth, dict) else None
        try:
            claims = verify_token(self.settings.require_secret(), token, app=app)
        except AuthError as exc:
            log.info("refused connection to /%s: %s", app, exc)
            raise socketio.exceptions.ConnectionRefusedError(f"Authorization error: {exc}") from None
        uuid = auth.get("uuid") if isinstance(auth, dict) else None
        if not isinstance(uuid, str) or not uuid or len(uuid) > 200:
            uuid = sid
        client = Client(app=app, uuid=uuid, admin=claims.admin)
        self.clients[sid] = client
        metrics.CONNECTIONS.labels(app).inc()
        if claims.admin:
            await self.sio.enter_room(sid, ADMIN_CHANNEL, namespace=namespace)
        await self.status(app, "connection", uuid=uuid, admin=claims.admin)

    async def _on_disconnect(self, namespace: str, sid: str, reason: Any = None) -> None:
        client = self.clients.pop(sid, None)
        if client is None:
            return
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
        try:
            if handler is None:
                raise ProtocolError(
                    "unknown_event",
                    f"unknown event {event[:60]!r}; expected subscribe, unsubscribe or publish",
                )
            if len(args) > 1:
                raise ProtocolError("bad_request", f"{event} takes one object argument")
            return await handler(self, sid, client, data)
        except ProtocolError as exc:
            metrics.MESSAGES_REJECTED.labels(exc.code).inc()
            reply = protocol.error(exc.code, exc.message, **exc.details)
            if not _wants_ack.get():
                await self.sio.emit(
                    "error", {**reply["error"], "event": event[:60]}, to=sid, namespace=namespace
                )
            return reply

    async def _subscribe(self, sid: str, client: Client, data: Any) -> dict[str, Any]:
        request = protocol.parse_subscribe(data)
        if ADMIN_CHANNEL in request.channels and not client.admin:
            raise ProtocolError("forbidden", "only admin tokens may subscribe to 'admin'")
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

    async def _publish(self, sid: str, client: Client, data: Any) -> dict[str, Any]:
        request = protocol.parse_publish(data, self.settings.max_message_bytes)
        metrics.MESSAGES_PUBLISHED.labels(client.app).inc()
        try:
            outcome = await self.pipeline.publish(
                client.app, request.channel, request.message, client.uuid
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

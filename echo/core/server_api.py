"""The HTTP server API: how an app's own backend talks to Echo without holding a socket.

Every route is under ``/api/{app}/``, JSON in and out, answered like a socket ack
(``{ok: true, ...}`` or ``{ok: false, error: {code, message}}``), and needs
``Authorization: Bearer`` with that app's admin token or a management token: user tokens
and other apps' tokens are refused. Publishes go through the channel's functions like any
other, with the backend's own rate limit (``backend_publish_rate`` per app and node).
``/api/openapi.json`` describes it all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from echo.core import metrics, protocol
from echo.core.auth import AuthError, verify_token
from echo.core.limits import TokenBucket
from echo.core.openapi import document
from echo.core.protocol import ErrorCode, ProtocolError
from echo.core.realtime import MAX_UUID_LENGTH, spend

if TYPE_CHECKING:
    from echo.core.app import EchoServer

MAX_BODY_BYTES = 1024 * 1024
MAX_BROADCAST_CHANNELS = 100
MAX_CHANNELS_LISTED = 1000
BACKEND_UUID = "server"
"""The ``uuid`` a server-API publish carries when the request names none."""

STATUS = {
    ErrorCode.BAD_REQUEST: 400, ErrorCode.BAD_CHANNEL: 400, ErrorCode.TOO_LARGE: 413,
    ErrorCode.FORBIDDEN: 403, ErrorCode.UNAUTHORIZED: 401, ErrorCode.FUNCTION_ERROR: 502,
    ErrorCode.OVERLOADED: 503, ErrorCode.RATE_LIMITED: 429, ErrorCode.LIMIT: 400,
    ErrorCode.SERVER_SHUTDOWN: 503, ErrorCode.UNAVAILABLE: 503, ErrorCode.INTERNAL: 500,
}


class OrjsonResponse(JSONResponse):
    """A JSON answer rendered by orjson: starlette's stdlib ``json.dumps`` was a tenth of the
    server's CPU per HTTP publish (bodies here are orjson-parsed, so orjson can render them)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


Endpoint = Callable[["ServerApi", Request, str], Awaitable[dict[str, Any]]]


class ServerApi:
    """The routes, bound to one server; a backend's rate limit per app on this node."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.buckets: dict[str, TokenBucket | None] = {}

    def routes(self) -> list[Route]:
        def route(path: str, endpoint: Endpoint, method: str) -> Route:
            async def handle(request: Request) -> JSONResponse:
                return await self._answer(request, endpoint)
            return Route(path, handle, methods=[method])

        async def openapi(request: Request) -> JSONResponse:
            return JSONResponse(document())

        return [
            Route("/api/openapi.json", openapi, methods=["GET"]),
            route("/api/{app}/publish", ServerApi.publish, "POST"),
            route("/api/{app}/broadcast", ServerApi.broadcast, "POST"),
            route("/api/{app}/presence", ServerApi.presence, "GET"),
            route("/api/{app}/channels", ServerApi.channels, "GET"),
            route("/api/{app}/history", ServerApi.history, "GET"),
            route("/api/{app}/disconnect", ServerApi.disconnect, "POST"),
            route("/api/{app}/unsubscribe", ServerApi.unsubscribe, "POST"),
        ]

    async def _answer(self, request: Request, endpoint: Endpoint) -> JSONResponse:
        app = request.path_params["app"]
        try:
            self._authorise(request, app)
            body = await endpoint(self, request, app)
        except ProtocolError as exc:
            return OrjsonResponse(protocol.error(exc.code, exc.message, **exc.details),
                                  status_code=STATUS.get(exc.code, 400))
        return OrjsonResponse(body)

    def _authorise(self, request: Request, app: str) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "send the app's admin token: "
                                f"Authorization: Bearer <jwt> (`echoctl jwt {app[:80]} --admin`)")
        settings = self.server.settings
        try:
            claims = verify_token(settings.secrets_for(app), token.strip(), app=app)
        except AuthError as app_refusal:
            try:
                claims = verify_token(settings.management_secrets(), token.strip())
            except AuthError:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, str(app_refusal)) from None
            if not claims.manage:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, str(app_refusal)) from None
            request.state.claims = None  # a management token: every operation
            return
        request.state.claims = claims
        if not claims.admin:
            raise ProtocolError(ErrorCode.FORBIDDEN, "a user token may not use the server API: "
                                "send the app's admin token (or a management token)")

    @staticmethod
    def _may(request: Request, operation: str, channel: str) -> None:
        """An admin token limited by ``capabilities`` is held to them here too."""
        claims = getattr(request.state, "claims", None)
        if claims is not None and not claims.may(operation, channel):
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"this token may not {operation} on {channel[:80]!r}")

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"the body is over {MAX_BODY_BYTES} bytes")
        try:  # strict, as the socket's: no NaN, nesting and integers bounded
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
        return data

    def _take(self, app: str) -> None:
        if app not in self.buckets:
            self.buckets[app] = self.server.realtime.publish_bucket(backend=True)
        spend(self.buckets[app], f"publishes/s for app {app[:80]!r} on this node "
                                 "(backend_publish_rate)")

    async def publish(self, request: Request, app: str) -> dict[str, Any]:
        data = await self._body(request)
        uuid = _uuid(data, default=BACKEND_UUID)
        fields = {k: v for k, v in data.items() if k != "uuid"}
        publish = protocol.parse_publish(fields, self.server.settings.max_message_bytes)
        self._may(request, "publish", publish.channel)
        self._take(app)
        self._refuse_draining()
        metrics.MESSAGES_PUBLISHED.inc(app)
        return await self.server.realtime.publish_as(app, uuid, publish)

    async def broadcast(self, request: Request, app: str) -> dict[str, Any]:
        data = await self._body(request)
        uuid = _uuid(data, default=BACKEND_UUID)
        channels = data.get("channels")
        if (not isinstance(channels, list) or not channels
                or len(channels) > MAX_BROADCAST_CHANNELS):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "channels must be a list of 1 to "
                                f"{MAX_BROADCAST_CHANNELS} channel names")
        if len(set(map(str, channels))) != len(channels):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "channels names a channel twice")
        if "message" not in data:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "broadcast.message is missing")
        limit = self.server.settings.max_message_bytes
        requests = [protocol.parse_publish({"channel": channel, "message": data["message"]}, limit)
                    for channel in channels]  # every name checked before anything is sent
        for publish in requests:
            self._may(request, "publish", publish.channel)
        self._refuse_draining()
        results: dict[str, Any] = {}
        for publish in requests:
            try:
                self._take(app)
                metrics.MESSAGES_PUBLISHED.inc(app)
                results[publish.channel] = await self.server.realtime.publish_as(app, uuid, publish)
            except ProtocolError as exc:
                results[publish.channel] = protocol.error(exc.code, exc.message, **exc.details)
        return protocol.ok(results=results)

    async def presence(self, request: Request, app: str) -> dict[str, Any]:
        channel = protocol.check_channel(request.query_params.get("channel"), "channel")
        self._may(request, "presence", channel)
        return await self.server.realtime.presence_of(app, channel)

    async def channels(self, request: Request, app: str) -> dict[str, Any]:
        """The channels with subscribers now, on every node, and how many each has."""
        try:
            names = await self.server.broker.occupied(app, MAX_CHANNELS_LISTED)
        except Exception as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE,
                                f"channels unavailable ({type(exc).__name__}); retry") from None
        counts: list[dict[str, Any]] = []
        for start in range(0, len(names), 50):
            batch = names[start:start + 50]
            here = await asyncio.gather(*(self.server.realtime.presence_of(app, name)
                                          for name in batch))
            counts += [{"channel": h["channel"], "count": h["count"]} for h in here if h["count"]]
        return protocol.ok(channels=counts)

    async def history(self, request: Request, app: str) -> dict[str, Any]:
        query: dict[str, Any] = {"channel": request.query_params.get("channel")}
        for name in ("limit", "since"):
            if (value := request.query_params.get(name)) is not None:
                query[name] = _whole(value, name)
        if (reverse := request.query_params.get("reverse")) is not None:
            if reverse not in ("true", "false", "1", "0"):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "reverse must be true or false")
            query["reverse"] = reverse in ("true", "1")
        ask = protocol.parse_history(query)
        self._may(request, "subscribe", ask.channel)
        reply = await self.server.realtime.read_history(app, ask)
        epoch = request.query_params.get("epoch")
        if epoch is not None and ask.since is not None and not ask.reverse:
            # as a recovery would: are the messages after `since` all there, from its epoch?
            # (every one of them: a `limit` that cuts them short is not a recovery)
            offsets = [p.get("offset") for p in reply["publications"]]
            missed = reply["offset"] - ask.since
            reply["recovered"] = reply["epoch"] == epoch and ask.since <= reply["offset"] and (
                missed == 0 or offsets == list(range(ask.since + 1, reply["offset"] + 1)))
        return reply

    async def disconnect(self, request: Request, app: str) -> dict[str, Any]:
        uuid = _uuid(await self._body(request))
        self.server.realtime.order(app, "disconnect", uuid)
        return protocol.ok(uuid=uuid)

    async def unsubscribe(self, request: Request, app: str) -> dict[str, Any]:
        data = await self._body(request)
        uuid = _uuid(data)
        channel = protocol.check_channel(data.get("channel"), "channel")
        self.server.realtime.order(app, "unsubscribe", uuid, channel)
        return protocol.ok(uuid=uuid, channel=channel)

    def _refuse_draining(self) -> None:
        if self.server.realtime.draining:
            raise ProtocolError(ErrorCode.SERVER_SHUTDOWN,
                                "this node is shutting down; send it to another node")


def _uuid(data: dict[str, Any], default: str | None = None) -> str:
    """The request's ``uuid`` (the sender of a publish, or the user an order is for)."""
    uuid = data.get("uuid", default)
    if not isinstance(uuid, str) or not 1 <= len(uuid) <= MAX_UUID_LENGTH:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"uuid must be a string of 1-{MAX_UUID_LENGTH} characters")
    return uuid


def _whole(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{name} must be a whole number") from None

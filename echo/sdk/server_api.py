"""Typed clients for the HTTP server API (``/api/{app}/...``), sync and async, on httpx.

Each route is described once (:class:`Call`); the two clients only send it, so they
cannot drift apart."""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import httpx

from echo.sdk.errors import EchoError, checked
from echo.sdk.tokens import admin_token

REFRESH_BEFORE_S = 60  # a token minted from the secret is replaced this long before it expires
MINTED_TTL_S = 3600


@dataclass(frozen=True)
class Call:
    """One request to the server API: what to send, and what it is called in errors."""

    what: str
    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def publish_call(channel: str, message: Any, uuid: str | None,
                 idempotency_key: str | None) -> Call:
    return Call("publish", "POST", "/publish", {"channel": channel, "message": message,
                                               **_without_none(uuid=uuid,
                                                               idempotencyKey=idempotency_key)})


def broadcast_call(channels: list[str], message: Any, uuid: str | None) -> Call:
    return Call("broadcast", "POST", "/broadcast",
                {"channels": channels, "message": message, **_without_none(uuid=uuid)})


def presence_call(channel: str) -> Call:
    return Call("presence", "GET", "/presence", params={"channel": channel})


def channels_call() -> Call:
    return Call("channels", "GET", "/channels")


def history_call(channel: str, limit: int | None, since: int | None, epoch: str | None,
                 reverse: bool) -> Call:
    params = {"channel": channel, **_without_none(limit=limit, since=since, epoch=epoch)}
    if reverse:
        params["reverse"] = "true"
    return Call("history", "GET", "/history", params=params)


def disconnect_call(uuid: str) -> Call:
    return Call("disconnect", "POST", "/disconnect", {"uuid": uuid})


def unsubscribe_call(uuid: str, channel: str) -> Call:
    return Call("unsubscribe", "POST", "/unsubscribe", {"uuid": uuid, "channel": channel})


class BearerToken(httpx.Auth):
    """A fixed token, or one minted from the app's secret and renewed before it expires,
    so a long-running backend never sends an expired one."""

    def __init__(self, app: str, token: str | None, secret: str | None) -> None:
        if (token is None) == (secret is None):
            raise ValueError("give the server API client a token or the app's secret, not both")
        self.app, self.secret = app, secret
        self.token = token or ""
        self.expires = float("inf") if token is not None else 0.0

    def current(self) -> str:
        if self.secret is not None and time.time() > self.expires - REFRESH_BEFORE_S:
            self.token = admin_token(self.secret, self.app, ttl=MINTED_TTL_S)
            self.expires = time.time() + MINTED_TTL_S
        return self.token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.current()}"
        yield request


def _base_url(url: str, app: str) -> str:
    return f"{url.rstrip('/')}/api/{app}"


def _unreachable(exc: httpx.HTTPError, what: str) -> EchoError:
    """No answer at all: ``timeout``, or ``unreachable`` (the request may not have arrived;
    a publish with an idempotency key is safe to retry)."""
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "unreachable"
    return EchoError(code, f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def _answer(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise EchoError("bad_reply", f"{what}: HTTP {response.status_code}, not JSON: "
                                     f"{response.text[:200]}") from None
    return checked(body, what)


class ServerApi:
    """``ServerApi(url, app, token)`` with the app's admin token (:func:`echo.sdk.admin_token`)
    or a management token; or ``ServerApi(url, app, secret=...)`` to mint and renew the
    admin token itself."""

    def __init__(self, url: str, app: str, token: str | None = None, *,
                 secret: str | None = None, timeout: float = 10.0) -> None:
        self.http = httpx.Client(base_url=_base_url(url, app), timeout=timeout,
                                 auth=BearerToken(app, token, secret))

    def send(self, call: Call) -> dict[str, Any]:
        try:
            response = self.http.request(call.method, call.path, json=call.json,
                                         params=call.params)
        except httpx.HTTPError as exc:
            raise _unreachable(exc, call.what) from exc
        return _answer(response, call.what)

    def publish(self, channel: str, message: Any, *, uuid: str | None = None,
                idempotency_key: str | None = None) -> dict[str, Any]:
        """Through the channel's functions; the ack (``id``, ``delivered``, ``offset``...)."""
        return self.send(publish_call(channel, message, uuid, idempotency_key))

    def broadcast(self, channels: list[str], message: Any, *,
                  uuid: str | None = None) -> dict[str, Any]:
        """One message on several channels: ``{"results": {channel: ack or error}}``."""
        return self.send(broadcast_call(channels, message, uuid))

    def presence(self, channel: str) -> dict[str, Any]:
        """Who is subscribed now, on every node: ``{"count", "clients": [{uuid, ...}]}``."""
        return self.send(presence_call(channel))

    def channels(self) -> dict[str, Any]:
        """The channels with subscribers now: ``{"channels": [{channel, count}]}``."""
        return self.send(channels_call())

    def history(self, channel: str, *, limit: int | None = None, since: int | None = None,
                epoch: str | None = None, reverse: bool = False) -> dict[str, Any]:
        """Kept messages as delivered; with ``since`` and ``epoch``, ``recovered`` says
        whether every one after ``since`` is there."""
        return self.send(history_call(channel, limit, since, epoch, reverse))

    def disconnect(self, uuid: str) -> dict[str, Any]:
        """Disconnect every connection of that user, on every node."""
        return self.send(disconnect_call(uuid))

    def unsubscribe(self, uuid: str, channel: str) -> dict[str, Any]:
        """Take every connection of that user out of ``channel``."""
        return self.send(unsubscribe_call(uuid, channel))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncServerApi:
    """The same as :class:`ServerApi`, for asyncio."""

    def __init__(self, url: str, app: str, token: str | None = None, *,
                 secret: str | None = None, timeout: float = 10.0) -> None:
        self.http = httpx.AsyncClient(base_url=_base_url(url, app), timeout=timeout,
                                      auth=BearerToken(app, token, secret))

    async def send(self, call: Call) -> dict[str, Any]:
        try:
            response = await self.http.request(call.method, call.path, json=call.json,
                                               params=call.params)
        except httpx.HTTPError as exc:
            raise _unreachable(exc, call.what) from exc
        return _answer(response, call.what)

    async def publish(self, channel: str, message: Any, *, uuid: str | None = None,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        return await self.send(publish_call(channel, message, uuid, idempotency_key))

    async def broadcast(self, channels: list[str], message: Any, *,
                        uuid: str | None = None) -> dict[str, Any]:
        return await self.send(broadcast_call(channels, message, uuid))

    async def presence(self, channel: str) -> dict[str, Any]:
        return await self.send(presence_call(channel))

    async def channels(self) -> dict[str, Any]:
        return await self.send(channels_call())

    async def history(self, channel: str, *, limit: int | None = None, since: int | None = None,
                      epoch: str | None = None, reverse: bool = False) -> dict[str, Any]:
        return await self.send(history_call(channel, limit, since, epoch, reverse))

    async def disconnect(self, uuid: str) -> dict[str, Any]:
        return await self.send(disconnect_call(uuid))

    async def unsubscribe(self, uuid: str, channel: str) -> dict[str, Any]:
        return await self.send(unsubscribe_call(uuid, channel))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncServerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

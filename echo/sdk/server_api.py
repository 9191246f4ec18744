"""Typed clients for the HTTP server API (``/api/{app}/...``), sync and async, on httpx."""

from __future__ import annotations

from typing import Any

import httpx

from echo.sdk.errors import EchoError, checked


def _publish_body(channel: str, message: Any, uuid: str | None,
                  idempotency_key: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": channel, "message": message}
    if uuid is not None:
        body["uuid"] = uuid
    if idempotency_key is not None:
        body["idempotencyKey"] = idempotency_key
    return body


def _history_query(channel: str, limit: int | None, since: int | None, epoch: str | None,
                   reverse: bool) -> dict[str, Any]:
    query: dict[str, Any] = {"channel": channel}
    for name, value in (("limit", limit), ("since", since), ("epoch", epoch)):
        if value is not None:
            query[name] = value
    if reverse:
        query["reverse"] = "true"
    return query


def _answer(response: httpx.Response, what: str) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise EchoError("bad_reply", f"{what}: HTTP {response.status_code}, not JSON: "
                                     f"{response.text[:200]}") from None
    return checked(body, what)


class ServerApi:
    """``ServerApi(url, app, token)``: ``token`` is the app's admin token (see
    :func:`echo.sdk.admin_token`) or a management token."""

    def __init__(self, url: str, app: str, token: str, *, timeout: float = 10.0) -> None:
        self.http = httpx.Client(base_url=f"{url.rstrip('/')}/api/{app}", timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def publish(self, channel: str, message: Any, *, uuid: str | None = None,
                idempotency_key: str | None = None) -> dict[str, Any]:
        """Through the channel's functions; the ack (``id``, ``delivered``, ``offset``...)."""
        return _answer(self.http.post("/publish", json=_publish_body(
            channel, message, uuid, idempotency_key)), "publish")

    def broadcast(self, channels: list[str], message: Any, *,
                  uuid: str | None = None) -> dict[str, Any]:
        """One message on several channels: ``{"results": {channel: ack or error}}``."""
        body: dict[str, Any] = {"channels": channels, "message": message}
        if uuid is not None:
            body["uuid"] = uuid
        return _answer(self.http.post("/broadcast", json=body), "broadcast")

    def presence(self, channel: str) -> dict[str, Any]:
        """Who is subscribed now, on every node: ``{"count", "clients": [{uuid, ...}]}``."""
        return _answer(self.http.get("/presence", params={"channel": channel}), "presence")

    def history(self, channel: str, *, limit: int | None = None, since: int | None = None,
                epoch: str | None = None, reverse: bool = False) -> dict[str, Any]:
        """Kept messages as delivered; with ``since`` and ``epoch``, ``recovered`` says
        whether every one after ``since`` is there."""
        return _answer(self.http.get("/history", params=_history_query(
            channel, limit, since, epoch, reverse)), "history")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServerApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncServerApi:
    """The same as :class:`ServerApi`, for asyncio."""

    def __init__(self, url: str, app: str, token: str, *, timeout: float = 10.0) -> None:
        self.http = httpx.AsyncClient(base_url=f"{url.rstrip('/')}/api/{app}", timeout=timeout,
                                      headers={"Authorization": f"Bearer {token}"})

    async def publish(self, channel: str, message: Any, *, uuid: str | None = None,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        return _answer(await self.http.post("/publish", json=_publish_body(
            channel, message, uuid, idempotency_key)), "publish")

    async def broadcast(self, channels: list[str], message: Any, *,
                        uuid: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"channels": channels, "message": message}
        if uuid is not None:
            body["uuid"] = uuid
        return _answer(await self.http.post("/broadcast", json=body), "broadcast")

    async def presence(self, channel: str) -> dict[str, Any]:
        return _answer(await self.http.get("/presence", params={"channel": channel}), "presence")

    async def history(self, channel: str, *, limit: int | None = None, since: int | None = None,
                      epoch: str | None = None, reverse: bool = False) -> dict[str, Any]:
        return _answer(await self.http.get("/history", params=_history_query(
            channel, limit, since, epoch, reverse)), "history")

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncServerApi:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

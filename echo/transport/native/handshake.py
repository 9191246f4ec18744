"""What every request to ``/socket.io/`` is checked for, and how a refusal is answered.

Refusals carry the JSON bodies of the reference server (engine.io), so clients and tools that
read them see the same ``{"code": N, "message": ...}``. CORS: an allowed ``Origin`` is echoed
(with credentials, which ``*`` cannot carry); a disallowed one is refused, for WebSockets too
(browsers do not apply CORS to them, so this is the only guard against cross-site use).
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from echo.transport import codec

__all__ = ["Receive", "Scope", "Send"]

Headers = list[tuple[bytes, bytes]]


class Refusal(NamedTuple):
    status: int
    code: int
    message: str

    def body(self) -> bytes:
        return codec.dumps({"code": self.code, "message": self.message}).encode()


UNKNOWN_TRANSPORT = Refusal(400, 0, "Transport unknown")
UNKNOWN_SID = Refusal(400, 1, "Session ID unknown")
BAD_HANDSHAKE_METHOD = Refusal(400, 2, "Bad handshake method")
BAD_REQUEST = Refusal(400, 3, "Bad request")
FORBIDDEN = Refusal(403, 4, "Forbidden")
UNSUPPORTED_PROTOCOL_VERSION = Refusal(400, 5, "Unsupported protocol version")
SHUTTING_DOWN = Refusal(503, 3, "Server shutting down")
PAYLOAD_TOO_LARGE = Refusal(413, 3, "Payload too large")


def query(scope: Scope) -> dict[str, str]:
    """The query parameters (the first value of each)."""
    params: dict[str, str] = {}
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        params.setdefault(key, value)
    return params


def check(params: dict[str, str], transport: str) -> Refusal | None:
    """``EIO=4`` and ``transport`` as this kind of request (``polling`` over HTTP,
    ``websocket`` over a WebSocket) can serve."""
    asked = params.get("transport")
    if asked not in ("polling", "websocket"):
        return UNKNOWN_TRANSPORT
    if asked != transport:
        return BAD_REQUEST  # a WebSocket asked for over plain HTTP, or polling over a WebSocket
    if params.get("EIO") != "4":
        return UNSUPPORTED_PROTOCOL_VERSION
    return None


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class Cors:
    """The ``cors_origins`` setting: ``*`` or a list of origins."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def allows(self, origin: str | None) -> bool:
        return origin is None or self.any or origin in self.origins

    def headers(self, origin: str | None) -> Headers:
        if origin is None:
            return []
        return [(b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-allow-credentials", b"true"),
                (b"vary", b"Origin")]

    def preflight(self, scope: Scope, origin: str | None) -> Headers:
        requested = header(scope, b"access-control-request-headers") or "content-type"
        return [*self.headers(origin),
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", b"86400")]


async def respond(send: Send, status: int, body: bytes, content_type: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]})
    await send({"type": "http.response.body", "body": body})


async def refuse_http(send: Send, refusal: Refusal, headers: Headers) -> None:
    await respond(send, refusal.status, refusal.body(), b"application/json", headers)


async def refuse_websocket(send: Send, refusal: Refusal) -> None:
    """Refuse a WebSocket before accepting it: uvicorn answers HTTP 403.

    (An HTTP answer with the JSON body, through the ASGI ``websocket.http.response``
    extension, makes uvicorn's websockets-sansio server log an error per refusal: anyone
    could fill the log with them.)"""
    del refusal  # what the client learns is the 403; the reason is in our own log line
    await send({"type": "websocket.close", "code": 1008})

"""The dev server's own endpoints answer only its own pages (and tools without a browser).

``/dev/token`` mints admin tokens and the inspector publishes and shows every message: a
page from another site open in the same browser must not reach them. A browser names the
page's origin on every cross-origin request (``Origin``, and ``Sec-Fetch-Site``); those
from another site are refused, whatever ``cors_origins`` allows elsewhere. Pages served
on this machine (another localhost port: a front-end's own dev server) are let in.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from echo.core import protocol
from echo.core.protocol import ErrorCode

Endpoint = Callable[[Request], Awaitable[Response]]


LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def _named_by_ip_or_localhost(host: str) -> bool:
    """A Host a DNS rebinding cannot forge: an IP literal, or localhost."""
    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def foreign(request: Request) -> bool:
    """Sent by a page of another site: not this server's own pages, nor a page served on
    this machine (a front-end dev server on another localhost port is allowed). A request
    for this server under another DNS name (``Host: rebound.example``) is foreign too: a
    rebound name would make a foreign page look same-origin."""
    if not _named_by_ip_or_localhost(request.headers.get("host", "")):
        return True
    origin = request.headers.get("origin")
    if origin is None:
        # same-origin GET, curl, scripts; a browser marks a cross-site one anyway
        return request.headers.get("sec-fetch-site") == "cross-site"
    if urlsplit(origin).netloc == request.headers.get("host", ""):
        return False
    host = (request.headers.get("host", "").rsplit(":", 1)[0])
    return not (urlsplit(origin).hostname in LOOPBACK and host in LOOPBACK)


def own_pages_only(endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        if foreign(request):
            response: Response = JSONResponse(protocol.error(
                ErrorCode.FORBIDDEN, "the dev server's own endpoints answer only its own pages"),
                status_code=403)
            return response
        return await endpoint(request)
    return guarded

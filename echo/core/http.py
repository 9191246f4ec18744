"""HTTP endpoints beside the sockets: health, readiness and the associations document.

``/associations`` needs a management token (``Authorization: Bearer <jwt>``, ``echoctl jwt
--manage``); user and app admin tokens are refused. Ekko's CLI form also works: no header, and
the body ``{"token": <JWT whose payload is the document>}`` signed with a management secret
(so ``ekko update`` keeps working). An invalid document gets 400 and the previous one stays
in force.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from echo.core import protocol
from echo.core.associations import AssociationsError, parse_associations, parse_associations_text
from echo.core.auth import AuthError, Claims, verify_signed_document, verify_token
from echo.core.protocol import ErrorCode

if TYPE_CHECKING:
    from echo.core.app import EchoServer

log = logging.getLogger("echo.http")

MAX_ASSOCIATIONS_BYTES = 1024 * 1024


def _problem(status: int, code: ErrorCode, message: str, **details: object) -> JSONResponse:
    return JSONResponse(protocol.error(code, message, **details), status_code=status)


def _management_claims(request: Request, secrets: tuple[str, ...]) -> Claims | JSONResponse:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return _problem(
            401, ErrorCode.UNAUTHORIZED, "send a management token: Authorization: Bearer <jwt> "
            "(`echoctl jwt --manage`)"
        )
    try:
        claims = verify_token(secrets, token.strip())
    except AuthError as exc:
        return _problem(401, ErrorCode.UNAUTHORIZED, str(exc))
    if not claims.manage:
        return _problem(403, ErrorCode.FORBIDDEN, "a management token is required (`echoctl jwt --manage`); "
                                          "user and app admin tokens are refused")
    return claims


def _signed_document(body: bytes, secrets: tuple[str, ...]) -> dict[str, object] | JSONResponse:
    """Ekko's ``{"token": <JWT of the document>}``: the signature is the authorisation."""
    unauthorised = _problem(401, ErrorCode.UNAUTHORIZED, "send a management token: "
                            "Authorization: Bearer <jwt> (`echoctl jwt --manage`), or Ekko's "
                            "{\"token\": <the document signed as a JWT>}")
    try:
        wrapper = json.loads(body)
    except (ValueError, RecursionError):
        return unauthorised
    if not isinstance(wrapper, dict) or set(wrapper) != {"token"}:
        return unauthorised
    try:
        return verify_signed_document(secrets, wrapper["token"])
    except AuthError as exc:
        return _problem(401, ErrorCode.UNAUTHORIZED, f"the document's token: {exc}")


def routes(server: EchoServer) -> list[Route]:
    secrets = server.settings.management_secrets()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def detail_allowed(request: Request) -> bool:
        """Hosts, paths, versions and counters are for operators: a management token, or
        everyone where ``public_status`` says so (the dev server's default)."""
        if server.settings.public_status:
            return True
        return not isinstance(_management_claims(request, secrets), JSONResponse)

    async def ready(request: Request) -> JSONResponse:
        problems = await server.readiness_problems()
        body: dict[str, object] = {"ready": not problems}
        if detail_allowed(request):
            body["problems"] = problems
        elif problems:
            body["detail"] = "send a management token for the problems (`echoctl jwt --manage`)"
        return JSONResponse(body, status_code=503 if problems else 200)

    async def get_associations(request: Request) -> JSONResponse:
        claims = _management_claims(request, secrets)
        if isinstance(claims, JSONResponse):
            return claims
        return JSONResponse(server.associations.document)

    async def put_associations(request: Request) -> JSONResponse:
        ekko_form = "authorization" not in request.headers
        if not ekko_form:
            claims = _management_claims(request, secrets)
            if isinstance(claims, JSONResponse):
                return claims
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_ASSOCIATIONS_BYTES:
                return _problem(
                    413, ErrorCode.TOO_LARGE, f"the document is over {MAX_ASSOCIATIONS_BYTES} bytes"
                )
        try:
            if ekko_form:
                document = _signed_document(body, secrets)
                if isinstance(document, JSONResponse):
                    return document
                associations = parse_associations(document)
            else:
                associations = parse_associations_text(body, source="request body")
        except AssociationsError as exc:
            return _problem(400, ErrorCode.INVALID_ASSOCIATIONS, str(exc), path=exc.path)
        missing = server.function_problems(associations)
        if missing:
            return _problem(400, ErrorCode.INVALID_ASSOCIATIONS, "; ".join(missing[:5]),
                            path=missing[0].split(":", 1)[0])
        try:
            stored = await server.replace_associations(
                associations, source="PUT /associations"
            )
        except Exception as exc:
            log.error("PUT /associations not stored in %s: %s", server.store.describe(), exc)
            return _problem(
                503, ErrorCode.UNAVAILABLE,
                f"could not store the document in {server.store.describe()} ({exc}); "
                "nothing was changed, try again",
            )
        return JSONResponse(
            {"ok": True, "version": stored.version, "applications": sorted(stored.apps)}
        )

    async def metrics_endpoint(request: Request) -> Response:
        if not detail_allowed(request):
            return _problem(401, ErrorCode.UNAUTHORIZED, "/metrics needs a management token "
                            "(Authorization: Bearer, `echoctl jwt --manage`), or public_status")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", metrics_endpoint),
        Route("/associations", get_associations, methods=["GET"]),
        Route("/associations", put_associations, methods=["PUT"]),
        *client_routes,
    ]


CLIENT_DIR = Path(__file__).resolve().parent.parent / "client"
SOCKET_IO_DIST = CLIENT_DIR / "node_modules" / "socket.io-client" / "dist"
_CLIENT_FILES = {
    "echo.js": CLIENT_DIR / "echo.js",
    "socket.io.esm.min.js": SOCKET_IO_DIST / "socket.io.esm.min.js",
    "socket.io.esm.min.js.map": SOCKET_IO_DIST / "socket.io.esm.min.js.map",
}


async def client_file(request: Request) -> Response:
    """The browser client (``/client/echo.js``) and the socket.io-client build it imports."""
    path = _CLIENT_FILES.get(request.path_params["name"])
    if path is None:
        return PlainTextResponse("no such client file", status_code=404)
    if not path.exists():
        return PlainTextResponse(
            f"{path.name} is missing: install the browser client's dependencies with "
            f"`npm ci --prefix {CLIENT_DIR}`",
            status_code=503,
        )
    media = "application/json" if path.suffix == ".map" else "text/javascript"
    return FileResponse(path, media_type=media)


client_routes = [Route("/client/{name}", client_file)]

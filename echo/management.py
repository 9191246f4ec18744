"""The one client of a server's management API (``/associations``), for the CLI and targets.

Signs a short-lived management token with the deployment's secret and speaks JSON over
httpx. A refusal and an unreachable server are told apart, so each caller can say what to
do next.
"""

from __future__ import annotations

from typing import Any

import httpx

from echo.core.auth import issue_management_token

TOKEN_TTL = 60


class ManagementError(Exception):
    """The server answered, but not with 2xx: ``status`` and the start of its body."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} answered {status}: {body[:500]}")
        self.status = status
        self.body = body[:500]


class Unreachable(Exception):
    """No answer from the server (refused, unresolvable, timed out)."""


def call(method: str, url: str, secret: str, body: Any = None, *, timeout: float = 15) -> Any:
    """``method`` ``url`` with a management token; the decoded JSON answer (None if empty)."""
    headers = {"authorization": f"Bearer {issue_management_token(secret, ttl=TOKEN_TTL)}"}
    try:
        reply = httpx.request(method, url, json=body, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise Unreachable(f"cannot reach {url} ({type(exc).__name__}: {exc})") from exc
    if not reply.is_success:
        raise ManagementError(method, url, reply.status_code, reply.text)
    return reply.json() if reply.content else None


def put_associations(endpoint: str, document: Any, secret: str, *, timeout: float = 15) -> Any:
    """PUT the associations document to a running server; its answer (with ``version``)."""
    return call("PUT", endpoint.rstrip("/") + "/associations", secret, document,
                timeout=timeout)

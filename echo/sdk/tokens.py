"""Tokens a backend mints for its users: short-lived, naming the user, optionally limited."""

from __future__ import annotations

from echo.core.auth import issue_token


def user_token(secret: str, app: str, uuid: str, *, ttl: int = 3600,
               capabilities: dict[str, list[str]] | None = None) -> str:
    """A token for one user of ``app``: its connections are ``uuid`` (and ``user:<uuid>``
    opens to them), it expires after ``ttl`` seconds, and ``capabilities`` (e.g.
    ``{"chat:*": ["subscribe", "publish"]}``) limits what it may do."""
    return issue_token(secret, app, uuid=uuid, ttl=ttl, capabilities=capabilities)


def admin_token(secret: str, app: str, *, ttl: int | None = 3600) -> str:
    """The app's admin token: the HTTP server API, the status channel, backend rate limits."""
    return issue_token(secret, app, admin=True, ttl=ttl)

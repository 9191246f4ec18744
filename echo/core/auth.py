"""Tokens: Ekko-compatible HS256 JWTs carrying ``appName`` and ``admin``.

The algorithm is pinned to HS256 so a token can never choose its own verification
(``alg: none``, RS/HS confusion). ``exp`` and ``nbf`` are honoured when present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
LEEWAY_SECONDS = 5


class AuthError(Exception):
    """A credential was refused; the message says why, without echoing the token."""


@dataclass(frozen=True)
class Claims:
    app: str
    admin: bool


def issue_token(secret: str, app: str, *, admin: bool = False, ttl: int | None = None) -> str:
    """Sign a token for ``app``; ``ttl`` seconds adds an ``exp`` claim."""
    payload: dict[str, object] = {"appName": app, "admin": admin, "iat": int(time.time())}
    if ttl is not None:
        payload["exp"] = int(time.time()) + ttl
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: object, *, app: str | None = None) -> Claims:
    """Check signature, expiry and claims; with ``app``, also that the token is for that app."""
    if not isinstance(token, str) or not token:
        raise AuthError("missing token: pass auth {jwt: <token>} (see `echoctl jwt APP`)")
    try:
        payload = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            leeway=LEEWAY_SECONDS,
            options={"require": ["appName"]},
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired: get a new one (`echoctl jwt APP`)") from None
    except jwt.ImmatureSignatureError:
        raise AuthError("token not valid yet (nbf is in the future)") from None
    except jwt.MissingRequiredClaimError:
        raise AuthError("token has no appName claim") from None
    except jwt.InvalidAlgorithmError:
        raise AuthError(f"token algorithm not allowed (only {ALGORITHM})") from None
    except jwt.InvalidSignatureError:
        raise AuthError("bad token signature: was it signed with this server's secret?") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None

    token_app = payload.get("appName")
    if not isinstance(token_app, str) or not token_app:
        raise AuthError("token appName claim must be a non-empty string")
    admin = payload.get("admin", False)
    if not isinstance(admin, bool):
        raise AuthError("token admin claim must be true or false")
    if app is not None and token_app != app:
        raise AuthError(f"token is for app {token_app!r}, not {app!r}")
    return Claims(app=token_app, admin=admin)

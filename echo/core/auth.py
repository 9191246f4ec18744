"""Tokens: Ekko-compatible HS256 JWTs carrying ``appName`` and ``admin``, plus Echo's extras.

* The algorithm is pinned to HS256, so a token can never choose its own verification
  (``alg: none``, RS/HS confusion). ``exp`` and ``nbf`` are honoured with 5 s of leeway.
* Secrets can be per app and rotate: the first secret of a list signs, every one verifies,
  so old tokens keep working while the new secret rolls out.
* ``capabilities`` (optional, like Ably's): ``{"chat:*": ["subscribe", "publish"]}`` limits
  a token to the operations it lists on matching channels. Without it, a token may do all.
* Management tokens (``manage: true``) are the only credential for the HTTP management API
  (``/associations``); user and app-admin tokens are refused there.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

ALGORITHM = "HS256"
LEEWAY_SECONDS = 5
OPERATIONS = frozenset({"subscribe", "publish", "presence", "history"})
MANAGEMENT_APP = "*"


class AuthError(Exception):
    """A credential was refused; the message says why, without echoing the token."""


@dataclass(frozen=True)
class Capabilities:
    """Which operations a token may perform on which channels (patterns may use globs)."""

    rules: tuple[tuple[str, frozenset[str]], ...]

    def allows(self, operation: str, channel: str) -> bool:
        return any(
            operation in operations and fnmatch.fnmatchcase(channel, pattern)
            for pattern, operations in self.rules
        )

    @classmethod
    def parse(cls, claim: object) -> Capabilities:
        if not isinstance(claim, dict) or not claim:
            raise AuthError("capabilities claim must be an object of channel pattern -> operations")
        rules = []
        for pattern, operations in claim.items():
            if not isinstance(operations, list) or not all(isinstance(o, str) for o in operations):
                raise AuthError(f"capabilities[{pattern!r}] must be a list of operations")
            wanted = set(operations)
            if "*" in wanted:
                wanted = set(OPERATIONS)
            unknown = wanted - OPERATIONS
            if unknown:
                raise AuthError(
                    f"capabilities[{pattern!r}]: unknown operation {sorted(unknown)[0]!r} "
                    f"(use {', '.join(sorted(OPERATIONS))} or *)"
                )
            rules.append((pattern, frozenset(wanted)))
        return cls(tuple(rules))


@dataclass(frozen=True)
class Claims:
    app: str
    admin: bool
    manage: bool = False
    capabilities: Capabilities | None = None
    user: str | None = None
    """The user's id the token vouches for (``uuid`` claim, or ``sub``): the handshake uuid
    must then match it, and only it may subscribe to its personal channel."""

    def may(self, operation: str, channel: str) -> bool:
        return self.capabilities is None or self.capabilities.allows(operation, channel)


MAX_USER_ID = 200


def issue_token(
    secret: str,
    app: str,
    *,
    admin: bool = False,
    ttl: int | None = None,
    capabilities: dict[str, list[str]] | None = None,
    uuid: str | None = None,
) -> str:
    """Sign a token for ``app``; ``ttl`` seconds adds an ``exp`` claim; ``uuid`` names the
    user it is for (its connections must say that uuid; its personal channel opens)."""
    payload: dict[str, object] = {"appName": app, "admin": admin, "iat": int(time.time())}
    if ttl is not None:
        payload["exp"] = int(time.time()) + ttl
    if capabilities is not None:
        payload["capabilities"] = capabilities
    if uuid is not None:
        payload["uuid"] = uuid
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def issue_management_token(secret: str, ttl: int | None = 300) -> str:
    """A token for the HTTP management API (``/associations``), short-lived by default."""
    payload: dict[str, object] = {"appName": MANAGEMENT_APP, "manage": True, "iat": int(time.time())}
    if ttl is not None:
        payload["exp"] = int(time.time()) + ttl
    return jwt.encode(payload, secret, algorithm=ALGORITHM)


def _decode(token: str, secrets: Sequence[str], required: Sequence[str] = ("appName",)
            ) -> dict[str, object]:
    """Try each secret in turn; only a bad signature moves on to the next one."""
    for secret in secrets:
        try:
            return jwt.decode(
                token, secret, algorithms=[ALGORITHM], leeway=LEEWAY_SECONDS,
                options={"require": list(required)},
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired: get a new one (`echoctl jwt APP`)") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not valid yet (nbf is in the future)") from None
        except jwt.MissingRequiredClaimError:
            raise AuthError("token has no appName claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm not allowed (only {ALGORITHM})") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
    raise AuthError("bad token signature: was it signed with this server's secret?")


REGISTERED_CLAIMS = ("iat", "exp", "nbf")


def verify_signed_document(secrets: Sequence[str], token: object) -> dict[str, object]:
    """The document a JWT carries as its payload, as Ekko's CLI sends associations
    (``PUT /associations {token}``, signed with the server's secret): verified like any
    token, without the registered claims."""
    if not isinstance(token, str) or not token:
        raise AuthError("token must be a non-empty string (a JWT)")
    payload = _decode(token, secrets, required=())
    return {key: value for key, value in payload.items() if key not in REGISTERED_CLAIMS}


class VerifiedTokens:
    """Tokens whose signature and claims were checked, so a backend sending the same admin
    token with every HTTP request (or a reconnect storm of one user's token) pays the HMAC
    and the JSON once: a hit re-checks only ``exp``/``nbf`` against the clock. Keyed by the
    token *and* the secrets it was verified with, so a rotated secret starts over; only
    accepted tokens are kept (a forger cannot fill it), at most ``size``, oldest out first."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.entries: dict[tuple[str, tuple[str, ...]], tuple[Claims, float, float]] = {}

    def get(self, token: str, secrets: tuple[str, ...]) -> Claims | None:
        entry = self.entries.get((token, secrets))
        if entry is None:
            return None
        claims, expires, not_before = entry
        now = time.time()
        if now > expires + LEEWAY_SECONDS:
            del self.entries[(token, secrets)]
            raise AuthError("token expired: get a new one (`echoctl jwt APP`)")
        if now < not_before - LEEWAY_SECONDS:
            raise AuthError("token not valid yet (nbf is in the future)")
        return claims

    def put(self, token: str, secrets: tuple[str, ...], claims: Claims,
            payload: dict[str, object]) -> None:
        expires, not_before = payload.get("exp"), payload.get("nbf")
        if len(self.entries) >= self.size:
            del self.entries[next(iter(self.entries))]
        self.entries[(token, secrets)] = (
            claims, float(expires) if isinstance(expires, int | float) else float("inf"),
            float(not_before) if isinstance(not_before, int | float) else float("-inf"))


VERIFIED = VerifiedTokens()


def verify_token(secrets: str | Sequence[str], token: object, *, app: str | None = None) -> Claims:
    """Check signature, expiry and claims; with ``app``, also that the token is for that app."""
    if not isinstance(token, str) or not token:
        raise AuthError("missing token: pass auth {jwt: <token>} (see `echoctl jwt APP`)")
    keys = (secrets,) if isinstance(secrets, str) else tuple(secrets)
    claims = VERIFIED.get(token, keys)
    if claims is None:
        payload = _decode(token, keys)
        claims = _claims(payload)
        VERIFIED.put(token, keys, claims, payload)
    if app is not None and claims.app != app:
        raise AuthError(f"token is for app {claims.app[:80]!r}, not {app[:80]!r}")
    return claims


def _claims(payload: dict[str, object]) -> Claims:
    """The checked claims of a verified token's payload."""
    token_app = payload.get("appName")
    if not isinstance(token_app, str) or not token_app:
        raise AuthError("token appName claim must be a non-empty string")
    admin = payload.get("admin", False)
    manage = payload.get("manage", False)
    if not isinstance(admin, bool) or not isinstance(manage, bool):
        raise AuthError("token admin and manage claims must be true or false")
    capabilities = None
    if "capabilities" in payload:
        capabilities = Capabilities.parse(payload["capabilities"])
    user = payload.get("uuid", payload.get("sub"))
    if user is not None and (not isinstance(user, str) or not 1 <= len(user) <= MAX_USER_ID):
        raise AuthError(f"token uuid (or sub) claim must be a string of 1-{MAX_USER_ID} characters")
    return Claims(app=token_app, admin=admin, manage=manage, capabilities=capabilities, user=user)

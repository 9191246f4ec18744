"""Checking a webhook request on the receiving backend: signed by Echo, recent, JSON."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from echo.core.webhooks import signature
from echo.sdk.errors import EchoError

TOLERANCE_S = 300
"""How old a request's timestamp may be: an older one is refused as a possible replay."""


def verify_webhook(secret: str, headers: Mapping[str, str], body: bytes, *,
                   tolerance: int = TOLERANCE_S) -> dict[str, Any]:
    """The request's JSON (``{"id", "app", "events": [...]}``) if ``body`` is signed with
    ``secret`` and its timestamp is within ``tolerance`` seconds of now; otherwise
    :class:`EchoError` with code ``bad_signature`` naming what is wrong. Pass the raw body,
    before any JSON parsing, and headers that look up case-insensitively (any web
    framework's do)."""
    timestamp = headers.get("echo-webhook-timestamp")
    sent = headers.get("echo-webhook-signature")
    if not timestamp or not sent:
        raise EchoError("bad_signature", "not an Echo webhook: echo-webhook-timestamp or "
                                         "echo-webhook-signature header missing")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise EchoError("bad_signature", "echo-webhook-timestamp is not unix seconds")
    age = abs(time.time() - int(timestamp))
    expected = signature(secret, timestamp, body).encode()
    if not hmac.compare_digest(expected, sent.encode("utf-8", "replace")):
        raise EchoError("bad_signature", "the signature does not match (another secret, or "
                                         "the body was changed)")
    if age > tolerance:
        raise EchoError("bad_signature", f"the timestamp is {int(age)} s away from now "
                                         f"(more than {tolerance} s): a replay?")
    try:
        payload = json.loads(body)
    except ValueError:
        raise EchoError("bad_signature", "the body is not JSON") from None
    if not isinstance(payload, dict):
        raise EchoError("bad_signature", "the body is not a JSON object")
    return payload

"""The one exception the SDK raises for a refusal: the server's error, code first."""

from __future__ import annotations

from typing import Any


class EchoError(Exception):
    """Echo refused a request (``code`` as in the README's error codes), or it timed out
    (``timeout``), could not be reached (``unreachable``), or answered something that is not
    an ack (``bad_reply``)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or {}


def checked(reply: Any, what: str) -> dict[str, Any]:
    """The ack if it says ``ok``; else the EchoError it carries."""
    if isinstance(reply, dict) and reply.get("ok") is True:
        return reply
    error = reply.get("error") if isinstance(reply, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        raise EchoError(error["code"], str(error.get("message", "")), error)
    raise EchoError("bad_reply", f"{what}: unexpected answer {str(reply)[:200]}")

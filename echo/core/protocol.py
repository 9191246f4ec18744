"""The wire: Ekko-shaped client payloads, validated, and Echo's ack and error shapes.

Only this module knows what a Socket.IO payload looks like; everything behind it works on
plain values. Every rejection is a :class:`ProtocolError` with a stable ``code`` and a
message that names the offending field.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

ADMIN_CHANNEL = "admin"
PRESENCE_SUFFIX = "#presence"
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9_\-:.@=/]{1,200}$")
MAX_CHANNELS_PER_REQUEST = 100


class ErrorCode(StrEnum):
    """Every ``error.code`` Echo answers with, on the socket and over HTTP (README: Error codes)."""

    BAD_REQUEST = "bad_request"
    BAD_CHANNEL = "bad_channel"
    TOO_LARGE = "too_large"
    FORBIDDEN = "forbidden"
    UNKNOWN_EVENT = "unknown_event"
    FUNCTION_ERROR = "function_error"
    OVERLOADED = "overloaded"
    RATE_LIMITED = "rate_limited"
    LIMIT = "limit"
    SERVER_SHUTDOWN = "server_shutdown"
    INTERNAL = "internal"
    UNAUTHORIZED = "unauthorized"
    INVALID_ASSOCIATIONS = "invalid_associations"
    UNAVAILABLE = "unavailable"


class ProtocolError(Exception):
    """A request Echo refuses; ``code`` is machine-readable, the message is for people."""

    def __init__(self, code: ErrorCode, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


@dataclass(frozen=True)
class SubscribeRequest:
    channels: tuple[str, ...]
    with_presence: bool


@dataclass(frozen=True)
class PublishRequest:
    channel: str
    message: Any


def check_channel(name: Any, field: str = "channel") -> str:
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{field} must be a string, got {_kind(name)}")
    if not CHANNEL_NAME.match(name):
        raise ProtocolError(ErrorCode.BAD_CHANNEL,
            f"{field} {name[:80]!r} is not a channel name: 1-200 characters of letters, "
            "digits and _ - : . @ = /",
        )
    return name


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _object(data: Any, event: str, example: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{event} expects an object like {example}")
    return data


def _channels(data: dict[str, Any], event: str) -> tuple[str, ...]:
    channels = data.get("channels")
    if not isinstance(channels, list) or not channels:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{event}.channels must be a non-empty list of names")
    if len(channels) > MAX_CHANNELS_PER_REQUEST:
        raise ProtocolError(ErrorCode.BAD_REQUEST,
            f"{event}.channels has {len(channels)} names; at most {MAX_CHANNELS_PER_REQUEST}",
        )
    return tuple(check_channel(c, f"{event}.channels[{i}]") for i, c in enumerate(channels))


def parse_subscribe(data: Any) -> SubscribeRequest:
    data = _object(data, "subscribe", '{"channels": ["news"]}')
    with_presence = data.get("withPresence", False)
    if not isinstance(with_presence, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "subscribe.withPresence must be true or false")
    return SubscribeRequest(channels=_channels(data, "subscribe"), with_presence=with_presence)


def parse_unsubscribe(data: Any) -> tuple[str, ...]:
    return _channels(_object(data, "unsubscribe", '{"channels": ["news"]}'), "unsubscribe")


def parse_publish(data: Any, max_message_bytes: int) -> PublishRequest:
    data = _object(data, "publish", '{"channel": "news", "message": {...}}')
    channel = check_channel(data.get("channel"), "publish.channel")
    if channel == ADMIN_CHANNEL:
        raise ProtocolError(ErrorCode.FORBIDDEN, "publish: the admin channel is for server status only")
    if "message" not in data:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "publish.message is missing")
    message = data["message"]
    try:
        size = len(orjson.dumps(message))
    except orjson.JSONEncodeError as exc:  # e.g. an integer beyond 64 bits, or a huge nesting
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"publish.message cannot be relayed: {exc}") from None
    if size > max_message_bytes:
        raise ProtocolError(ErrorCode.TOO_LARGE,
            f"publish.message is {size} bytes encoded; the limit is {max_message_bytes}",
        )
    return PublishRequest(channel=channel, message=message)


def presence_room(channel: str) -> str:
    """The room of sockets that asked for presence on ``channel`` (not a valid channel name)."""
    return channel + PRESENCE_SUFFIX


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def error(code: ErrorCode, message: str, **fields: Any) -> dict[str, Any]:
    """The one error body: ``{ok: false, error: {code, message, ...}}`` (socket acks, HTTP)."""
    return {"ok": False, "error": {"code": str(code), "message": message, **fields}}


def status_payload(event: str, app: str, **details: Any) -> dict[str, Any]:
    """A ``status`` event: Ekko's ``{message: {event, app, uuid, admin}}`` plus flat fields."""
    core = {
        "event": event,
        "app": app,
        "uuid": details.pop("uuid", None),
        "admin": details.pop("admin", False),
    }
    return {**core, **details, "ts": int(time.time() * 1000), "message": dict(core)}

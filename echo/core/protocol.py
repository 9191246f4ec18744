"""The wire: Ekko-shaped client payloads, validated, and Echo's ack and error shapes.

Only this module knows what a Socket.IO payload looks like; everything behind it works on
plain values. Every rejection is a :class:`ProtocolError` with a stable ``code`` and a
message that names the offending field.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

ADMIN_CHANNEL = "admin"
PRESENCE_SUFFIX = "#presence"
CHANNEL_NAME = re.compile(r"^[A-Za-z0-9_\-:.@=/]{1,200}\Z")  # \Z: no trailing newline
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


MAX_IDEMPOTENCY_KEY = 200
MAX_HISTORY_LIMIT = 1000
MAX_OFFSET = 2**53 - 1
"""The largest offset a client may name: exact in JavaScript, and in Redis and Lua."""


@dataclass(frozen=True)
class Since:
    """Where a client left a history channel: the last offset it has, in which epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True)
class SubscribeRequest:
    channels: tuple[str, ...]
    with_presence: bool
    since: dict[str, Since] = field(default_factory=dict)


@dataclass(frozen=True)
class PublishRequest:
    channel: str
    message: Any
    idempotency_key: str | None = None


@dataclass(frozen=True)
class HistoryRequest:
    channel: str
    limit: int
    since: int | None
    reverse: bool


PERSONAL_PREFIX = "user:"
"""``user:<uuid>`` is that user's personal channel: every connection of that user (a token
with that ``uuid`` claim), on every node; publishing to it reaches them all."""


def personal_owner(channel: str) -> str | None:
    """The user whose personal channel this is, or None."""
    return channel[len(PERSONAL_PREFIX):] if channel.startswith(PERSONAL_PREFIX) else None


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
    channels = _channels(data, "subscribe")
    return SubscribeRequest(channels=channels, with_presence=with_presence,
                            since=_since(data.get("since"), channels))


def _since(value: Any, channels: tuple[str, ...]) -> dict[str, Since]:
    if value is None:
        return {}
    example = '{"news": {"offset": 41, "epoch": "..."}}'
    if not isinstance(value, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"subscribe.since must be an object like {example}")
    since: dict[str, Since] = {}
    for channel, position in value.items():
        where = f"subscribe.since[{str(channel)[:80]!r}]"
        if channel not in channels:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where}: not one of subscribe.channels")
        if not isinstance(position, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{where} must be an object like {example}")
        offset, epoch = position.get("offset"), position.get("epoch")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{where}.offset must be a whole number from 0 to {MAX_OFFSET}")
        if not isinstance(epoch, str) or len(epoch) > 64:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{where}.epoch must be a string (the one Echo sent)")
        since[channel] = Since(offset, epoch)
    return since


def parse_history(data: Any) -> HistoryRequest:
    data = _object(data, "history", '{"channel": "news", "limit": 50}')
    channel = check_channel(data.get("channel"), "history.channel")
    limit = data.get("limit", 100)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"history.limit must be 1 to {MAX_HISTORY_LIMIT}")
    since = data.get("since")
    if since is not None and (isinstance(since, bool) or not isinstance(since, int)
                              or not 0 <= since <= MAX_OFFSET):
        raise ProtocolError(ErrorCode.BAD_REQUEST,
                            f"history.since must be an offset (a whole number from 0 to {MAX_OFFSET})")
    reverse = data.get("reverse", False)
    if not isinstance(reverse, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "history.reverse must be true or false")
    return HistoryRequest(channel, limit, since, reverse)


def parse_presence(data: Any) -> str:
    data = _object(data, "presence", '{"channel": "news"}')
    return check_channel(data.get("channel"), "presence.channel")


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
    key = data.get("idempotencyKey")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "publish.idempotencyKey must be a string of "
                            f"1 to {MAX_IDEMPOTENCY_KEY} characters")
    return PublishRequest(channel=channel, message=message, idempotency_key=key)


def ekko_presence_channel(channel: str) -> str:
    """The ``presenceChannel`` field of a presence event: Ekko's name for the channel's
    presence room (informational; Echo's room is :func:`presence_room`)."""
    return channel + "_presence"


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

"""Engine.IO v4 and Socket.IO v5 packets: parsing what clients send, encoding what we send.

Everything leaves as an ASGI ``websocket.send`` message (a dict holding ``text`` or
``bytes``): that is what a WebSocket session hands to uvicorn as it is, and what a polling
session keeps in its buffer until a GET joins them into one ``\\x1e``-separated payload. So a
packet is encoded once, whichever transport the client is on (or moves to mid-way).

Parsing follows the two protocol documents; anything they do not allow raises
:class:`PacketError`, and the session that sent it is closed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from typing import Any, Final

from echo.transport import codec

Message = dict[str, Any]
"""An ASGI ``websocket.send`` message: ``{"type": "websocket.send", "text"|"bytes": ...}``."""


class PacketError(ValueError):
    """What a client sent is not a packet the protocols allow."""


# --- Engine.IO -----------------------------------------------------------------------------

EIO_OPEN: Final = "0"
EIO_CLOSE: Final = "1"
EIO_PING: Final = "2"
EIO_PONG: Final = "3"
EIO_MESSAGE: Final = "4"
EIO_UPGRADE: Final = "5"
EIO_NOOP: Final = "6"

SEPARATOR: Final = "\x1e"
"""Between the packets of one HTTP long-polling payload."""


def text_message(text: str) -> Message:
    return {"type": "websocket.send", "text": text}


def binary_message(data: bytes) -> Message:
    return {"type": "websocket.send", "bytes": data}


PING: Final = text_message(EIO_PING)
NOOP: Final = text_message(EIO_NOOP)
CLOSE: Final = text_message(EIO_CLOSE)
PROBE_PONG: Final = text_message(EIO_PONG + "probe")


def open_message(sid: str, upgrades: list[str], ping_interval: float, ping_timeout: float,
                 max_payload: int) -> Message:
    """The handshake's ``open`` packet; intervals go out as whole milliseconds, as the spec has
    them, without dropping sub-second values."""
    return text_message(EIO_OPEN + codec.dumps({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": round(ping_interval * 1000),
        "pingTimeout": round(ping_timeout * 1000),
        "maxPayload": max_payload,
    }))


def encode_payload(messages: list[Message]) -> str:
    """One long-polling response body: text packets as they are, binary ones as ``b<base64>``."""
    parts = []
    for message in messages:
        text = message.get("text")
        parts.append(text if text is not None else "b" + base64.b64encode(message["bytes"]).decode())
    return SEPARATOR.join(parts)


def decode_payload(body: str) -> Iterator[str | bytes]:
    """The packets of a long-polling POST body, any number of them, in order.

    Yields text packets as ``str`` and ``b<base64>`` ones as ``bytes``; raises
    :class:`PacketError` on reaching one that is not valid (the ones before it stand).
    """
    for part in body.split(SEPARATOR):
        if part[:1] == "b":
            try:
                yield base64.b64decode(part[1:], validate=True)
            except binascii.Error:
                raise PacketError("invalid base64 in a binary packet") from None
        else:
            yield part


# --- Socket.IO -----------------------------------------------------------------------------

CONNECT: Final = 0
DISCONNECT: Final = 1
EVENT: Final = 2
ACK: Final = 3
CONNECT_ERROR: Final = 4
BINARY_EVENT: Final = 5
BINARY_ACK: Final = 6

_ATTACHMENTS = re.compile(r"([0-9]+)-")
_DIGITS = re.compile(r"[0-9]+")
_MAX_ID_DIGITS: Final = 15  # ack ids are counters; beyond this they are not numbers a client keeps
_MISSING: Final[Any] = object()


class Packet:
    """One Socket.IO packet from a client; ``data`` is the parsed JSON payload (or None)."""

    __slots__ = ("ack_id", "attachments", "data", "kind", "namespace")

    def __init__(self, kind: int, namespace: str, data: Any, ack_id: int | None,
                 attachments: int) -> None:
        self.kind = kind
        self.namespace = namespace
        self.data = data
        self.ack_id = ack_id
        self.attachments = attachments


def decode(text: str, max_attachments: int) -> Packet:
    """Parse ``<type>[<attachments>-][<namespace>,][<ack id>][<JSON payload>]``.

    A binary packet announcing more than ``max_attachments`` is refused here, before anything
    of it is kept.
    """
    kind = ord(text[0]) - 48 if text else -1
    if not 0 <= kind <= 6:
        raise PacketError("unknown packet type")
    at = 1
    attachments = 0
    if kind == BINARY_EVENT or kind == BINARY_ACK:
        match = _ATTACHMENTS.match(text, at)
        if match is None:
            raise PacketError("binary packet without an attachment count")
        digits = match.group(1)
        if len(digits) > 6 or int(digits) > max_attachments:
            raise PacketError(f"binary packet announces {digits[:12]} attachments, more than allowed")
        attachments = int(digits)
        at = match.end()
    namespace = "/"
    if text.startswith("/", at):
        comma = text.find(",", at)
        if comma == -1:
            namespace, at = text[at:], len(text)
        else:
            namespace, at = text[at:comma], comma + 1
    ack_id = None
    match = _DIGITS.match(text, at)
    if match is not None:
        if match.end() - at > _MAX_ID_DIGITS:
            raise PacketError("ack id too long")
        ack_id = int(match.group())
        at = match.end()
    data = _MISSING
    if at < len(text):
        try:
            data = codec.loads(text[at:])
        except (ValueError, RecursionError):
            raise PacketError("payload is not JSON") from None
    if not _payload_fits(kind, data):
        raise PacketError("payload not allowed for this packet type")
    return Packet(kind, namespace, None if data is _MISSING else data, ack_id, attachments)


def _payload_fits(kind: int, data: Any) -> bool:
    """The payload rules of the spec, per packet type."""
    if kind == CONNECT:
        return data is _MISSING or type(data) is dict
    if kind == DISCONNECT:
        return data is _MISSING
    if kind == EVENT or kind == BINARY_EVENT:
        # "mandatory and MUST be a non-empty array"; the event name is what handlers dispatch on
        return type(data) is list and len(data) > 0 and type(data[0]) is str
    if kind == ACK or kind == BINARY_ACK:
        return type(data) is list
    return type(data) is str or type(data) is dict  # CONNECT_ERROR


def fill_placeholders(data: Any, attachments: list[bytes]) -> Any:
    """Put each attachment where its ``{"_placeholder": true, "num": i}`` stands.

    Walks the payload without recursion (it came from a client; its depth is theirs).
    """
    def resolve(value: Any) -> Any:
        if type(value) is dict and value.get("_placeholder") is True:
            num = value.get("num")
            if type(num) is not int or not 0 <= num < len(attachments):
                raise PacketError("placeholder for an attachment that does not exist")
            return attachments[num]
        if type(value) is list or type(value) is dict:
            stack.append(value)
        return value

    stack: list[Any] = []
    data = resolve(data)
    while stack:
        container = stack.pop()
        if type(container) is list:
            for index, item in enumerate(container):
                container[index] = resolve(item)
        else:
            for key, item in container.items():
                container[key] = resolve(item)
    return data


def _take_binary(value: Any, attachments: list[bytes]) -> Any:
    """``value`` with every bytes-like object replaced by a placeholder, appended to
    ``attachments`` (a server-side value: its depth is the application's)."""
    if isinstance(value, bytes | bytearray | memoryview):
        attachments.append(bytes(value))
        return {"_placeholder": True, "num": len(attachments) - 1}
    if isinstance(value, list | tuple):
        return [_take_binary(item, attachments) for item in value]
    if isinstance(value, dict):
        return {key: _take_binary(item, attachments) for key, item in value.items()}
    return value


def encode(kind: int, namespace: str, data: Any, ack_id: int | None = None) -> list[Message]:
    """An outgoing packet as the messages to send: one text message, followed by one binary
    message per attachment when ``data`` holds bytes (``EVENT``/``ACK`` become their
    ``BINARY_`` forms). Raises ``TypeError`` for values JSON cannot hold."""
    head = "" if namespace == "/" else namespace + ","
    if ack_id is not None:
        head += str(ack_id)
    if data is _MISSING:
        return [text_message(EIO_MESSAGE + str(kind) + head)]
    try:
        return [text_message(EIO_MESSAGE + str(kind) + head + codec.dumps(data))]
    except TypeError:
        attachments: list[bytes] = []
        data = _take_binary(data, attachments)
        if not attachments:
            raise
    kind = BINARY_EVENT if kind == EVENT else BINARY_ACK if kind == ACK else kind
    first = text_message(f"{EIO_MESSAGE}{kind}{len(attachments)}-{head}{codec.dumps(data)}")
    return [first, *(binary_message(part) for part in attachments)]


def encode_disconnect(namespace: str) -> list[Message]:
    return encode(DISCONNECT, namespace, _MISSING)

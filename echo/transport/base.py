"""The wire as the core sees it: connections, events in, prepared frames out.

Everything about Engine.IO and Socket.IO (handshakes, polling, WebSocket framing, heartbeat,
packet encoding) lives behind this interface, in :mod:`echo.transport.native` (Echo's own
server, the default) or :mod:`echo.transport.pysocketio` (python-socketio through its public
API, the reference). The core implements :class:`Handler` and calls :class:`Transport`; it
never sees a packet.

A namespace is an app (``/<app>``); a room is a channel (or ``<channel>#presence``,
``admin``) of that namespace, on this node only. What crosses nodes is the broker's job.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp

from echo.transport import TRANSPORTS, codec


class Refused(Exception):
    """Raised by :meth:`Handler.connect`: the client gets CONNECT_ERROR ``{message}``."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class Frame:
    """A Socket.IO EVENT packet encoded once, written as it is to every recipient.

    The packet (``2/app,["message",{...}]``) is the same on every transport and on every
    node: the broker carries its UTF-8 bytes (``packet``) between nodes and the receiving
    node writes them without decoding the JSON; a WebSocket wants it as ``text``. Each form
    is made from the other at most once. A transport may cache its own framing (``wire``),
    so a message is framed once, not once per recipient.
    """

    __slots__ = ("_packet", "_text", "offset", "wire")

    def __init__(self, *, packet: bytes | None = None, text: str | None = None,
                 offset: int | None = None) -> None:
        if packet is None and text is None:
            raise TypeError("Frame needs packet= (bytes) or text= (str)")
        self._packet = packet
        self._text = text
        self.offset = offset
        """A history channel's message: its position in the channel (else None)."""
        self.wire: Any = None

    @property
    def packet(self) -> bytes:
        if self._packet is None:
            assert self._text is not None
            self._packet = self._text.encode()
        return self._packet

    @property
    def text(self) -> str:
        if self._text is None:
            assert self._packet is not None
            self._text = self._packet.decode()
        return self._text

    @classmethod
    def event(cls, namespace: str, event: str, *args: Any) -> Frame:
        """Encode ``event(*args)`` for ``namespace``; raises TypeError for non-JSON values."""
        prefix = "2" if namespace == "/" else "2" + namespace + ","
        return cls(text=prefix + codec.dumps([event, *args]))

    def decode(self) -> tuple[str, str, list[Any]]:
        """(namespace, event, args): for a transport that cannot write prepared bytes."""
        body = self.text[1:]
        namespace = "/"
        if body.startswith("/"):
            namespace, _, body = body.partition(",")
        event, *args = codec.loads(body)
        return namespace, event, args

    def __repr__(self) -> str:
        return f"Frame({self.text[:60]!r})"


class Connection(abc.ABC):
    """One client connected to one namespace (app) through this node.

    ``state`` is the core's own per-connection object; the transport never reads it.
    """

    __slots__ = ()

    sid: str
    """Socket.IO session id of this namespace connection (random, never reused)."""
    namespace: str
    """``/<app>``."""
    state: Any = None

    @property
    def app(self) -> str:
        return self.namespace[1:]

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """Still connected: the handler may stop work for a connection that has left."""

    @property
    @abc.abstractmethod
    def transport_name(self) -> str:
        """``websocket`` or ``polling`` (what the client uses now)."""

    @property
    @abc.abstractmethod
    def rooms(self) -> frozenset[str]:
        """The rooms this connection is in (on this node)."""

    @abc.abstractmethod
    def emit(self, event: str, *args: Any) -> None:
        """Send one event to this connection only, in order with everything else sent to it."""

    @abc.abstractmethod
    def write(self, frame: Frame) -> None:
        """Send a prepared frame to this connection only (a recovered message), in order."""

    @abc.abstractmethod
    def ack(self, ack_id: int, *args: Any) -> None:
        """Answer the client's event ``ack_id`` (an ACK packet)."""

    @abc.abstractmethod
    def backlog(self) -> int:
        """Packets accepted for this connection and not yet written to its socket."""

    def throttle(self, seconds: float) -> None:  # noqa: B027 - optional
        """Read nothing more from this client for ``seconds`` (at most a second): a flood's
        frames wait in its own socket, not in the server's loop. A transport that cannot
        leaves it."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect this namespace connection from the server side (DISCONNECT packet)."""


class Handler(Protocol):
    """What the core implements. Calls for one connection never overlap: a transport awaits
    each before reading that connection's next packet, so a handler that may take long
    (a publish through functions) moves itself to a task."""

    async def connect(self, conn: Connection, auth: Any) -> None:
        """A client asks to join ``conn.namespace`` with its handshake ``auth``; raise
        :class:`Refused` to refuse it."""

    async def event(self, conn: Connection, event: str, args: list[Any],
                    ack_id: int | None) -> None:
        """An EVENT from the client; answer with ``conn.ack(ack_id, ...)`` when ``ack_id`` is
        not None (now or later)."""

    async def disconnect(self, conn: Connection, reason: str) -> None:
        """The connection is gone (client left, transport closed, ping timeout, server
        closed it). Called once per connected ``conn``, while it is still in its rooms."""


@dataclass(frozen=True)
class TransportOptions:
    """The wire settings both implementations honour."""

    ping_interval: float = 25.0
    """Seconds between the server's PINGs (sub-second values are kept, not truncated)."""
    ping_timeout: float = 20.0
    """Seconds to wait for a PONG after a PING before the connection is closed."""
    max_payload: int = 1_000_000
    """Bytes in one HTTP request body / WebSocket message the server accepts (``maxPayload``)."""
    connect_timeout: float = 45.0
    """Seconds an Engine.IO session may stay without connecting to any namespace."""
    max_attachments: int = 10
    """Binary attachments one Socket.IO packet may announce."""
    max_backlog: int = 1000
    """Packets waiting for one slow connection beyond which it is cut off (0: no limit)."""
    max_namespaces: int = 8
    """Namespaces (apps) one Engine.IO session may connect to at once."""
    cors_origins: tuple[str, ...] = ("*",)


class Transport(abc.ABC):
    """A Socket.IO server for this node: accepts connections, keeps rooms, writes frames."""

    name: str

    def __init__(self, handler: Handler, options: TransportOptions) -> None:
        self.handler = handler
        self.options = options
        self.slow_consumers = 0
        """Connections cut off because their backlog passed ``options.max_backlog``."""

    @abc.abstractmethod
    def asgi(self, other: ASGIApp) -> ASGIApp:
        """The ASGI app serving ``/socket.io/`` and passing every other request to ``other``."""

    @abc.abstractmethod
    def join(self, conn: Connection, room: str) -> bool:
        """Put ``conn`` in ``room``; True if it is the room's first member on this node."""

    @abc.abstractmethod
    def leave(self, conn: Connection, room: str) -> bool:
        """Take ``conn`` out of ``room``; True if the room is now empty on this node."""

    @abc.abstractmethod
    def write(self, namespace: str, room: str, frame: Frame) -> int:
        """Write ``frame`` to every member of ``room`` in ``namespace``, in order with
        everything sent to each; returns how many it was written to. Never waits."""

    @abc.abstractmethod
    def has_members(self, namespace: str, room: str) -> bool:
        """Whether ``room`` has members on this node."""

    @abc.abstractmethod
    def connections(self) -> Iterable[Connection]:
        """Every namespace connection on this node."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Called once the event loop runs, before the first connection."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Wait until what was written is on the sockets (graceful shutdown); callers bound
        the wait (``asyncio.timeout``)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop: close every connection as a transport close (clients reconnect elsewhere)."""


def load_transport(name: str) -> type[Transport]:
    """The transport class for the setting ``transport`` (one of :data:`TRANSPORTS`)."""
    if name not in TRANSPORTS:
        raise ValueError(f"transport {name!r} is not one of: {', '.join(TRANSPORTS)}")
    module, _, attribute = TRANSPORTS[name].partition(":")
    found = getattr(importlib.import_module(module), attribute)
    assert isinstance(found, type) and issubclass(found, Transport)
    return found

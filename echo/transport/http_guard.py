"""HTTP connections an attacker cannot hoard: headers within a time and a size, and a cap on
the connections one address holds open at once.

uvicorn (httptools) waits for a request's headers as long as the client likes, so a few
thousand half-sent requests ("slowloris") once held every file descriptor of a node. This
protocol is uvicorn's own HTTP protocol (passed as ``http=``) with three rules added through
its public callbacks:

- a request's headers must be complete within ``header_timeout`` seconds of the connection
  (or of the request's first byte on a kept-alive one), and its body within
  ``body_timeout`` seconds of its headers, else the connection is closed;
- the request line and headers must fit in :data:`MAX_HEADER_BYTES`;
- one IP address holds at most ``max_connections_per_ip`` connections (HTTP and the
  WebSockets upgraded from them; counted on the transports, which outlive the upgrade);
  more are closed at once. ``0`` turns the cap off.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import defaultdict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024


class Guard:
    """The limits, and the live connections per address (shared by a server's protocols)."""

    def __init__(self, header_timeout: float, max_connections_per_ip: int,
                 body_timeout: float = 30.0, keep_alive_timeout: float = 5.0) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.keep_alive_timeout = keep_alive_timeout
        self.max_connections_per_ip = max_connections_per_ip
        self.open: defaultdict[str, weakref.WeakSet[asyncio.BaseTransport]] = defaultdict(
            weakref.WeakSet)
        self.refused = 0
        self.timed_out = 0

    def admit(self, address: str | None, transport: asyncio.BaseTransport) -> bool:
        if address is None or not self.max_connections_per_ip:
            return True
        held = self.open[address]
        live = [t for t in held if not t.is_closing()]
        if len(live) >= self.max_connections_per_ip:
            self.refused += 1
            return False
        held.add(transport)
        return True

    def forget_closed(self, address: str | None) -> None:
        """Drop ``address``'s entry once none of its connections is open (one address per
        close: a disconnect storm stays linear)."""
        held = self.open.get(address) if address is not None else None
        if held is not None and not any(not t.is_closing() for t in held):
            del self.open[address]  # type: ignore[arg-type]


def guarded_protocol(guard: Guard) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol class held to ``guard``."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard_timer: asyncio.TimerHandle | None = None
            self._deadline: float | None = None
            self._header_bytes = 0
            self._has_body = False
            self._address: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = peer[0] if isinstance(peer, tuple) and peer else None
            self._address = address
            if not guard.admit(address, transport):
                transport.abort()  # uvicorn's connection_lost follows, as for any other
                return
            self._clock(guard.header_timeout)

        def _clock(self, seconds: float) -> None:
            """Close the connection unless what is awaited (headers, a body) is in within
            ``seconds``.

            One timer per connection, moved only when it fires early: a keep-alive client's
            every request sets a deadline (a float), not a new timer and a cancel (two per
            request were a fifteenth of the server's CPU per HTTP publish)."""
            loop = asyncio.get_running_loop()
            deadline = self._deadline = loop.time() + seconds
            timer = self._guard_timer
            if timer is not None and timer.when() > deadline:  # due sooner than it fires
                timer.cancel()
                timer = None
            if timer is None:
                self._guard_timer = loop.call_at(deadline, self._on_clock, self.transport)

        def _stop_clock(self, *, cancel: bool = False) -> None:
            """Nothing is due; ``cancel`` also drops the timer (which holds this protocol):
            for a request without a body, an upgrade, a closed connection. Between a
            keep-alive client's requests it stays, to be moved by the next one."""
            self._deadline = None
            if cancel and self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None

        def _on_clock(self, transport: asyncio.BaseTransport) -> None:
            self._guard_timer = None
            deadline = self._deadline
            if deadline is None or transport is not self.transport or transport.is_closing():
                return
            loop = asyncio.get_running_loop()
            if loop.time() < deadline:  # the deadline moved on since this timer was set
                self._guard_timer = loop.call_at(deadline, self._on_clock, transport)
                return
            guard.timed_out += 1
            transport.close()

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > MAX_HEADER_BYTES and self.transport is not None:
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            self._has_body = False
            self._clock(guard.header_timeout)  # (again, on a kept-alive one)

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            lowered = name.lower()
            if (lowered == b"content-length" and value.strip() not in (b"", b"0")) or (
                    lowered == b"transfer-encoding" and b"chunked" in value.lower()):
                self._has_body = True
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            if self._has_body:
                self._clock(guard.body_timeout)
            else:
                self._stop_clock(cancel=True)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._stop_clock()
            super().on_message_complete()

        def handle_websocket_upgrade(self) -> None:
            """The connection is the WebSocket protocol's from here on: let go of the HTTP
            parser as uvicorn does when a connection ends. The parser holds this protocol's
            callbacks, a cycle that outlived every upgrade as ~17 objects of garbage for the
            collector (during a connect storm, most of what a full collection found)."""
            super().handle_websocket_upgrade()
            self.parser = None  # type: ignore[assignment]

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_clock(cancel=True)
            guard.forget_closed(self._address)
            super().connection_lost(exc)

    return GuardedHttpProtocol

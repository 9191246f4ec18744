"""HTTP connections an attacker cannot hoard: headers within a time and a size, and a cap on
the connections one address holds open at once.

uvicorn (httptools) waits for a request's headers as long as the client likes, so a few
thousand half-sent requests ("slowloris") once held every file descriptor of a node. This
protocol is uvicorn's own HTTP protocol (passed as ``http=``) with three rules added through
its public callbacks:

- a request's headers must be complete within ``header_timeout`` seconds of the connection
  (or of the request's first byte on a kept-alive one), else the connection is closed;
- they must fit in :data:`MAX_HEADER_BYTES`;
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

    def __init__(self, header_timeout: float, max_connections_per_ip: int) -> None:
        self.header_timeout = header_timeout
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

    def forget_closed(self) -> None:
        for address in [a for a, held in self.open.items() if not any(
                not t.is_closing() for t in held)]:
            del self.open[address]


def guarded_protocol(guard: Guard) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol class held to ``guard``."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._guard_timer: asyncio.TimerHandle | None = None
            self._header_bytes: int | None = 0  # None once the headers are in

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            address = peer[0] if isinstance(peer, tuple) and peer else None
            if not guard.admit(address, transport):
                transport.abort()  # uvicorn's connection_lost follows, as for any other
                return
            self._start_header_clock(transport)

        def _start_header_clock(self, transport: asyncio.BaseTransport) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            self._header_bytes = 0
            self._guard_timer = asyncio.get_running_loop().call_later(
                guard.header_timeout, self._headers_too_slow, transport)

        def _headers_too_slow(self, transport: asyncio.BaseTransport) -> None:
            if self._header_bytes is not None and not transport.is_closing():
                guard.timed_out += 1
                transport.close()

        def data_received(self, data: bytes) -> None:
            if self._header_bytes is not None:
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self._header_bytes = None
                    if self.transport is not None:
                        self.transport.close()
                    return
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_bytes is None and self.transport is not None:  # the next request
                self._start_header_clock(self.transport)

        def on_headers_complete(self) -> None:
            self._header_bytes = None
            if self._guard_timer is not None:
                self._guard_timer.cancel()
                self._guard_timer = None
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._guard_timer is not None:
                self._guard_timer.cancel()
            guard.forget_closed()
            super().connection_lost(exc)

    return GuardedHttpProtocol

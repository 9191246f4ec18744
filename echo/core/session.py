"""A WebSocket session's read and write loops, without a task per packet.

engine.io's own loop wraps every read in a new task and ``asyncio.wait_for`` (to cut off a
client that has gone quiet), and every write wake-up in another ``wait_for``: on Python 3.11
that is a task, a timer and several callbacks per packet, paid again by every publish, ack
and ping. Here a session reads and writes with plain awaits, and one timer per connection,
re-armed lazily, enforces the same rule: a client that sends nothing (not even the answer to
a ping) for ``ping_interval + ping_timeout`` seconds is disconnected.

Behaviour otherwise matches engine.io's: the polling → WebSocket upgrade handshake, the size
limit on a received packet, and at the end the writer drained and the socket closed as a
transport close (so clients reconnect). Used for the connections that take the fast path
(:mod:`echo.core.broadcast`); the versions of engine.io it runs against are pinned.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from engineio import exceptions
from engineio import packet as eio_packet

log = logging.getLogger("echo.session")


class _ReadDeadline:
    """Cancels the reading task when nothing arrived for ``timeout`` seconds while it waited."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.timeout = timeout
        self.last = self.loop.time()
        self.waiting = False
        self.expired = False
        self.handle = self.loop.call_at(self.last + timeout, self._check)

    def _check(self) -> None:
        due = self.last + self.timeout
        if self.waiting and self.loop.time() >= due:
            self.expired = True
            assert self.task is not None
            self.task.cancel()
        else:  # something arrived since (or a handler is still running): look again later
            self.handle = self.loop.call_at(max(due, self.loop.time() + 1), self._check)

    def cancel(self) -> None:
        self.handle.cancel()


async def serve(sock: Any, ws: Any) -> None:
    """Run engine.io socket ``sock`` over WebSocket ``ws`` until either side closes it."""
    if sock.connected:  # it began on long-polling: this is the upgrade
        if not await _upgrade(sock, ws):
            return
    else:
        sock.connected = True
        sock.upgraded = True
    writer = asyncio.ensure_future(_write(sock, ws))
    try:
        await _read(sock, ws)
    finally:
        await sock.queue.put(None)  # lets the writer finish what is queued, then stop
        await writer
        while not sock.queue.empty():  # what a failed writer left: nobody waits on it
            sock.queue.get_nowait()
            sock.queue.task_done()
        await sock.close(wait=False, abort=True, reason=sock.server.reason.TRANSPORT_CLOSE)


async def _receive_one(sock: Any, ws: Any) -> eio_packet.Packet | None:
    data = await ws.wait()
    if data is None or len(data) > sock.server.max_http_buffer_size:
        return None
    return eio_packet.Packet(encoded_packet=data)


async def _upgrade(sock: Any, ws: Any) -> bool:
    """The probe exchange that moves a long-polling client onto this WebSocket."""
    sock.upgrading = True
    try:
        probe = await _receive_one(sock, ws)
        if probe is None or probe.packet_type != eio_packet.PING or probe.data != "probe":
            return False
        await ws.send(eio_packet.Packet(eio_packet.PONG, data="probe").encode())
        await sock.queue.put(eio_packet.Packet(eio_packet.NOOP))  # ends the pending poll
        upgrade = await _receive_one(sock, ws)
        if upgrade is None or upgrade.packet_type != eio_packet.UPGRADE:
            sock.upgraded = False
            return False
        sock.upgraded = True
        return True
    except (OSError, ValueError):
        return False
    finally:
        sock.upgrading = False


async def _read(sock: Any, ws: Any) -> None:
    server = sock.server
    deadline = _ReadDeadline(server.ping_interval + server.ping_timeout)
    loop = deadline.loop
    try:
        while True:
            deadline.waiting = True
            try:
                pkt = await _receive_one(sock, ws)
            except asyncio.CancelledError:
                if not deadline.expired:
                    raise
                assert deadline.task is not None
                deadline.task.uncancel()
                log.info("%s: nothing received for %ss, disconnecting", sock.sid,
                         deadline.timeout)
                return
            except Exception:  # the transport closed, or a malformed packet
                return
            deadline.waiting = False
            if pkt is None:
                return
            deadline.last = loop.time()
            if pkt.packet_type == eio_packet.PONG:  # the most common packet of an idle client
                sock.schedule_ping()
                continue
            try:
                await sock.receive(pkt)
            except exceptions.UnknownPacketError:
                pass
            except exceptions.SocketIsClosedError:
                return
            except Exception:  # a bug in a handler must not end the session
                log.exception("%s: error handling a packet", sock.sid)
    finally:
        deadline.cancel()


async def _write(sock: Any, ws: Any) -> None:
    queue = sock.queue
    try:
        while True:
            pkt = await queue.get()
            queue.task_done()
            if pkt is None:
                return
            await ws.send(pkt.encode())
    except Exception:  # the transport is gone; the reader sees it close too
        return
    finally:
        await ws.close()

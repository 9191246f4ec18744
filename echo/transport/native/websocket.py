"""The WebSocket transport: a session of its own, or the upgrade of a long-polling one.

An upgrade claims the session's single probe slot before the socket is even accepted, so a
second WebSocket for the same sid (during the probe or after it) is refused and never sees
the session's pings or messages. The probed socket becomes the session's transport only on
the client's ``upgrade`` packet, after ``2probe``/``3probe``.

The reader stops at once when the session ends: nothing the client sends after a ping
timeout, an invalid packet or a server close is processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Final

from echo.transport.native import handshake, packets
from echo.transport.native.handshake import Receive, Scope, Send
from echo.transport.native.session import TRANSPORT_CLOSE, TRANSPORT_ERROR
from echo.transport.websocket_protocol import EXTENSION, EchoWebSocketProtocol

if TYPE_CHECKING:
    from echo.transport.native.server import NativeTransport
    from echo.transport.native.sockets import Session

log = logging.getLogger("echo.transport")

UPGRADE_TIMEOUT: Final = 10.0
"""Seconds from accepting a probe WebSocket to the client's ``upgrade`` packet."""

MESSAGE_TOO_BIG: Final = 1009
POLICY_VIOLATION: Final = 1008


async def serve(server: NativeTransport, scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    if not server.cors.allows(handshake.header(scope, b"origin")):
        await _refuse(scope, send, handshake.FORBIDDEN)
        return
    params = handshake.query(scope)
    refusal = handshake.check(params, "websocket")
    if refusal is not None:
        await _refuse(scope, send, refusal)
        return
    sid = params.get("sid")
    if sid is None:
        if server.closing:
            await _refuse(scope, send, handshake.SHUTTING_DOWN)
            return
        try:
            await send({"type": "websocket.accept"})
        except Exception:
            return
        await _read(server, server.new_session("websocket", send, _direct(scope)), receive)
        return
    session = server.sessions.get(sid)
    if session is None or session.closed:
        await _refuse(scope, send, handshake.UNKNOWN_SID)
        return
    if session.transport != "polling" or session.probe_send is not None:
        # a second WebSocket for the session: opened and closed at once, as the reference
        # server does (its clients treat a refused handshake as an error, a close as a close)
        log.info("session %s: a second WebSocket for it, closed", session.sid)
        with contextlib.suppress(Exception):
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": POLICY_VIOLATION})
        return
    session.probe_send = send
    try:
        await send({"type": "websocket.accept"})
    except Exception:
        session.end_probe()
        return
    if await _probe(session, receive, send, scope):
        await _read(server, session, receive)


async def _probe(session: Session, receive: Receive, send: Send, scope: Scope) -> bool:
    """``2probe`` → ``3probe`` (and a ``noop`` for the pending GET) → ``5``: then switch."""
    step = "2probe"
    try:
        async with asyncio.timeout(UPGRADE_TIMEOUT):
            message = await receive()
            if message.get("text") == "2probe" and not session.closed:
                await send(packets.PROBE_PONG)
                session.release_poll()
                step = "5"
                message = await receive()
    except TimeoutError:
        message = {"type": "timeout"}
    except Exception:  # the probe socket went away
        message = {"type": "error"}
    if message.get("text") == step == "5" and not session.closed and not session.posting:
        session.upgrade(send, _direct(scope))
        return True
    log.info("session %s: upgrade abandoned (expected %r, got %r)", session.sid, step,
             str(message.get("text", message.get("type")))[:80])
    if session.probe_send is send:  # else the session's close already closed it
        session.end_probe()
        try:
            await send({"type": "websocket.close", "code": 1000})
        except Exception:
            pass
    return False


async def _read(server: NativeTransport, session: Session, receive: Receive) -> None:
    """Hand each message to the session, in order, until the session or the socket ends.

    While it waits for a message the session holds this task (``session.reader``) and its
    close cancels the wait: returning then ends the ASGI call, and uvicorn closes the
    connection, also for a client that sends nothing more and cannot be sent a close frame.
    """
    limit = server.options.max_payload
    quarter = limit // 4  # no text this short can be over the limit in UTF-8
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    while not session.closed:
        session.reader = task
        try:
            held = session.held_until - loop.time()
            if held > 0:  # throttled (a flood): its next frames wait in its socket
                await asyncio.sleep(held)
            message = await receive()
        except asyncio.CancelledError:
            if task is not None and session.closed and task.uncancel() == 0:
                return  # the session's close stopped the wait (and only that)
            raise
        finally:
            session.reader = None
        if session.closed:
            return
        kind = message["type"]
        if kind == "websocket.receive":
            text = message.get("text")
            if text is not None:
                if len(text) > quarter and len(text.encode()) > limit:
                    _too_big(session, limit)
                    return
                await session.receive_text(text)
            else:
                data = message.get("bytes") or b""
                if len(data) > limit:
                    _too_big(session, limit)
                    return
                await session.receive_binary(data)
        elif kind == "websocket.disconnect":
            session.close(TRANSPORT_CLOSE)
            return


def _direct(scope: Scope) -> EchoWebSocketProtocol | None:
    """The connection, when Echo's own WebSocket server runs it (written to directly)."""
    extension = (scope.get("extensions") or {}).get(EXTENSION)
    connection = extension.get("connection") if isinstance(extension, dict) else None
    return connection if isinstance(connection, EchoWebSocketProtocol) else None


async def _refuse(scope: Scope, send: Send, refusal: handshake.Refusal) -> None:
    log.debug("WebSocket refused: %s (query %r)", refusal.message, bytes(scope.get("query_string", b""))[:80])
    await handshake.refuse_websocket(send, refusal)


def _too_big(session: Session, limit: int) -> None:
    log.info("session %s: WebSocket message over maxPayload (%d bytes), closing", session.sid, limit)
    session.close(TRANSPORT_ERROR, code=MESSAGE_TOO_BIG)

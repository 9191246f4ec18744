"""HTTP long-polling: a GET waits for what the server has to send, a POST carries what the
client sends.

A POST's packets (any number of them) are handled in order before it is answered ``ok``. One
GET and one POST at a time per session: a second of either is answered 400 and ends the
session (the spec's rule for packet order). A GET that waits also watches for its client
going away, which ends the session at once instead of at the next ping timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from echo.transport.native import handshake, packets
from echo.transport.native.handshake import Headers, Receive, Scope, Send
from echo.transport.native.packets import PacketError
from echo.transport.native.session import PARSE_ERROR, TRANSPORT_CLOSE, TRANSPORT_ERROR

if TYPE_CHECKING:
    from echo.transport.native.server import NativeTransport
    from echo.transport.native.sockets import Session

log = logging.getLogger("echo.transport")

TEXT = b"text/plain; charset=UTF-8"


async def serve(server: NativeTransport, scope: Scope, receive: Receive, send: Send) -> None:
    method = scope["method"]
    origin = handshake.header(scope, b"origin")
    if not server.cors.allows(origin):
        await handshake.refuse_http(send, handshake.FORBIDDEN, [])
        return
    cors = server.cors.headers(origin)
    if method == "OPTIONS":
        await handshake.respond(send, 204, b"", TEXT, server.cors.preflight(scope, origin))
        return
    params = handshake.query(scope)
    refusal = handshake.check(params, "polling")
    if refusal is not None:
        await handshake.refuse_http(send, refusal, cors)
        return
    sid = params.get("sid")
    if sid is None:
        if method != "GET":
            await handshake.refuse_http(send, handshake.BAD_HANDSHAKE_METHOD, cors)
        elif server.closing:
            await handshake.refuse_http(send, handshake.SHUTTING_DOWN, cors)
        else:
            sid = server.new_session("polling").sid
            body = packets.encode_payload([server.open_message(sid, ["websocket"])])
            await handshake.respond(send, 200, body.encode(), TEXT, cors)
        return
    session = server.sessions.get(sid)
    if session is None or (session.closed and (method != "GET" or not session.buffer)):
        await handshake.refuse_http(send, handshake.UNKNOWN_SID, cors)
    elif session.transport != "polling":
        await handshake.refuse_http(send, handshake.BAD_REQUEST, cors)  # it moved to WebSocket
    elif method == "GET":
        await _get(server, session, receive, send, cors)
    elif method == "POST":
        await _post(server, session, scope, receive, send, cors)
    else:
        await handshake.refuse_http(send, handshake.BAD_REQUEST, cors)


async def _get(server: NativeTransport, session: Session, receive: Receive, send: Send,
               cors: Headers) -> None:
    if session.getting:
        await _refuse_second(session, "GET while one is pending", send, cors)
        return
    session.getting = True
    try:
        await receive()  # the (empty) request body
        if not session.buffer and not session.closed:
            if session.probe_answered:
                session.write(packets.NOOP)  # upgrading: end this poll so the client can switch
            else:
                await _wait(session, receive)
        messages = session.take_buffer()
        if session.closed:
            server.forget(session)
    finally:
        session.getting = False
    if messages:
        await handshake.respond(send, 200, packets.encode_payload(messages).encode(), TEXT, cors)


async def _refuse_second(session: Session, what: str, send: Send, cors: Headers) -> None:
    """A second GET (or POST) at once breaks the order of packets: 400, and the session ends."""
    log.info("session %s: a second %s, closing", session.sid, what)
    session.close(TRANSPORT_ERROR)
    await handshake.refuse_http(send, handshake.BAD_REQUEST, cors)


async def _wait(session: Session, receive: Receive) -> None:
    """Until something is written for the client, or the client goes away."""
    waiter: asyncio.Future[None] = session.server.loop.create_future()
    session.poll_waiter = waiter
    gone = asyncio.ensure_future(receive())
    try:
        await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if session.poll_waiter is waiter:
            session.poll_waiter = None
    if not waiter.done() and not session.closed:
        log.debug("session %s: the client left its pending GET", session.sid)
        session.close(TRANSPORT_CLOSE)


async def _post(server: NativeTransport, session: Session, scope: Scope, receive: Receive, send: Send,
                cors: Headers) -> None:
    if session.posting:
        await _refuse_second(session, "POST while one is running", send, cors)
        return
    session.posting = True
    try:
        body = await _read_body(scope, receive, server.options.max_payload)
        if body is None:
            log.info("session %s: POST larger than maxPayload (%d bytes), closing", session.sid,
                     server.options.max_payload)
            session.close(TRANSPORT_ERROR)
            await handshake.refuse_http(send, handshake.PAYLOAD_TOO_LARGE, cors)
            return
        try:
            await _handle(session, body.decode())
        except UnicodeDecodeError:
            session.invalid("POST body is not UTF-8", body)
    finally:
        session.posting = False
    if session.closed and session.close_reason == PARSE_ERROR:
        await handshake.refuse_http(send, handshake.BAD_REQUEST, cors)
    else:
        await handshake.respond(send, 200, b"ok", TEXT, cors)


async def _handle(session: Session, body: str) -> None:
    """Each packet of one POST in turn; a throttled session's next packet waits, and so
    does the POST's answer (a long-polling client sends its next POST only after it)."""
    packets_in = packets.decode_payload(body)
    loop = asyncio.get_running_loop()
    while not session.closed:
        held = session.held_until - loop.time()
        if held > 0:
            await asyncio.sleep(held)
            continue
        try:
            packet = next(packets_in)
        except StopIteration:
            return
        except PacketError as exc:
            session.invalid(str(exc), body)
            return
        if isinstance(packet, str):
            await session.receive_text(packet)
        else:
            await session.receive_binary(packet)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` (read no further)."""
    length = handshake.header(scope, b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        return None
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)

"""Baseline: Echo's routing as a user would write it by hand with python-socketio.

Namespace per app, JWT checked at connect, ``subscribe``/``publish`` events, ``message``
emitted to the channel's room with the same fields Echo sends; no functions. Served by
``uvicorn.run`` with its defaults (whatever loop, HTTP and WebSocket implementations it picks,
per-message deflate on), because that is what a hand-written server gets.

    python bench/baseline_pysio.py --port 4000 [--redis redis://127.0.0.1:6379/0]

Environment: ECHO_SECRET (the HS256 key the bench signs its tokens with).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any

import jwt
import socketio
import uvicorn


def build(secret: str, redis_url: str | None = None) -> socketio.ASGIApp:
    manager = socketio.AsyncRedisManager(redis_url) if redis_url else None
    sio = socketio.AsyncServer(
        async_mode="asgi", namespaces="*", cors_allowed_origins="*", client_manager=manager
    )
    node = os.urandom(4).hex()
    ids = itertools.count(1)
    seqs: dict[tuple[str, str], int] = {}
    uuids: dict[str, str] = {}

    @sio.on("connect", namespace="*")
    async def connect(namespace: str, sid: str, environ: dict, auth: Any) -> None:
        try:
            claims = jwt.decode((auth or {}).get("jwt", ""), secret, algorithms=["HS256"])
        except jwt.InvalidTokenError:
            raise socketio.exceptions.ConnectionRefusedError("Authorization error") from None
        if claims.get("appName") != namespace[1:]:
            raise socketio.exceptions.ConnectionRefusedError("Authorization error")
        uuids[sid] = (auth or {}).get("uuid") or sid

    @sio.on("disconnect", namespace="*")
    async def disconnect(namespace: str, sid: str, reason: Any = None) -> None:
        uuids.pop(sid, None)

    @sio.on("subscribe", namespace="*")
    async def subscribe(namespace: str, sid: str, data: Any) -> dict[str, Any]:
        channels = [c for c in data.get("channels", []) if isinstance(c, str)]
        for channel in channels:
            await sio.enter_room(sid, channel, namespace=namespace)
        return {"ok": True, "channels": channels}

    @sio.on("publish", namespace="*")
    async def publish(namespace: str, sid: str, data: Any) -> dict[str, Any]:
        channel = data.get("channel")
        if not isinstance(channel, str) or channel == "admin":
            return {"ok": False, "error": {"code": "bad_channel", "message": "bad channel"}}
        key = (namespace, channel)
        seq = seqs[key] = seqs.get(key, 0) + 1
        message_id = f"{node}-{next(ids)}"
        ts = int(time.time() * 1000)
        await sio.emit(
            "message",
            {"channel": channel, "message": data.get("message"), "uuid": uuids.get(sid, sid),
             "id": message_id, "seq": seq, "ts": ts},
            room=channel, namespace=namespace,
        )
        return {"ok": True, "id": message_id, "seq": seq, "ts": ts, "delivered": True}

    return socketio.ASGIApp(sio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4000)
    parser.add_argument("--redis", default=None)
    args = parser.parse_args()
    uvicorn.run(build(os.environ["ECHO_SECRET"], args.redis), host=args.host, port=args.port)


if __name__ == "__main__":
    main()

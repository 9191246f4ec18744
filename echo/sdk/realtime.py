"""An async Socket.IO client for Echo that keeps its subscriptions and misses nothing.

It connects to the app's namespace over WebSocket, answers every request with the ack (or
raises :class:`EchoError`), and after a lost connection reconnects by itself (asking
``get_token`` for a fresh token each time), joins its channels again and, on history
channels, asks for what it missed since the last message it saw: those arrive first, in
order, once. ``on("state", ...)`` hears ``connected`` (after a reconnect with
``recovered: {channel: bool}``) and ``disconnected``.

``cipher={"secret": ChannelCipher(kid="k1", key=KEY), "private:*": ChannelCipher(...)}`` makes
channels end-to-end encrypted on this side (exact names, or globs: the first listed that
matches): publishes are sealed, messages and history opened, and what cannot be opened is an
``error`` event with code ``decrypt_failed`` instead of a message (see :mod:`echo.sdk.e2e`).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import socketio  # type: ignore[import-untyped]

from echo.sdk import e2e
from echo.sdk.errors import EchoError, checked

log = logging.getLogger("echo.sdk")

Listener = Callable[[dict[str, Any]], Awaitable[None] | None]
CHANNELS_PER_REQUEST = 100  # the server's max_channels_per_connection default


class RealtimeClient:
    """``RealtimeClient(url, app, token=... | get_token=..., uuid=None)``; ``await connect()``."""

    def __init__(self, url: str, app: str, *, token: str | None = None,
                 get_token: Callable[[], str | Awaitable[str]] | None = None,
                 uuid: str | None = None, ack_timeout: float = 10.0,
                 cipher: dict[str, e2e.ChannelCipher] | None = None) -> None:
        if (token is None) == (get_token is None):
            raise TypeError("give token= or get_token= (a callable for a fresh token)")
        self.url, self.app, self.uuid = url, app, uuid
        self.namespace = "/" + app
        self.ack_timeout = ack_timeout
        self._token, self._get_token = token, get_token
        self.channels: dict[str, bool] = {}
        """Subscribed channel → withPresence; joined again after every reconnect."""
        self.positions: dict[str, dict[str, Any]] = {}
        """Per history channel, the last ``{offset, epoch}`` seen: where a reconnect resumes."""
        self.state = "disconnected"
        self.cipher = dict(cipher or {})
        self._listeners: dict[str, list[Listener]] = {}
        self._connected_before = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.5,
                                        reconnection_delay_max=5)
        self.sio.on("connect", self._on_connect, namespace=self.namespace)
        self.sio.on("disconnect", self._on_disconnect, namespace=self.namespace)
        self.sio.on("message", self._on_message, namespace=self.namespace)
        for event in ("presence", "status", "error"):
            self.sio.on(event, self._relay(event), namespace=self.namespace)

    def on(self, event: str, listener: Listener) -> None:
        """``message``, ``presence``, ``status``, ``error`` or ``state``."""
        self._listeners.setdefault(event, []).append(listener)

    async def connect(self) -> None:
        await self.sio.connect(self.url, namespaces=[self.namespace], auth=self._auth,
                               transports=["websocket"], wait_timeout=10)

    async def close(self) -> None:
        """Disconnect for good (no reconnect)."""
        await self.sio.disconnect()
        for task in list(self._tasks):
            task.cancel()

    async def subscribe(self, channels: list[str], *, with_presence: bool = False) -> dict[str, Any]:
        fresh = [c for c in channels if c not in self.channels]
        for channel in channels:
            self.channels[channel] = with_presence
        try:
            reply = await self._request("subscribe", {"channels": channels,
                                                      "withPresence": with_presence})
        except EchoError:
            for channel in fresh:
                del self.channels[channel]
            raise
        for channel in reply.get("refused", {}):  # the others were joined
            if channel in fresh:
                del self.channels[channel]
        self._saw_positions(reply)
        return reply

    async def unsubscribe(self, channels: list[str]) -> dict[str, Any]:
        for channel in channels:
            self.channels.pop(channel, None)
            self.positions.pop(channel, None)
        return await self._request("unsubscribe", {"channels": channels})

    async def publish(self, channel: str, message: Any, *,
                      idempotency_key: str | None = None) -> dict[str, Any]:
        cipher = self.cipher_for(channel)
        if cipher is not None:
            key = cipher.key_for(channel, cipher.kid)
            if key is None:
                raise EchoError("no_key", f"publish: no key for {channel!r} (kid {cipher.kid!r})")
            message = e2e.encrypt(message, key, app=self.app, channel=channel, kid=cipher.kid)
        body: dict[str, Any] = {"channel": channel, "message": message}
        if idempotency_key is not None:
            body["idempotencyKey"] = idempotency_key
        return await self._request("publish", body)

    async def presence(self, channel: str) -> dict[str, Any]:
        """Who is subscribed to ``channel`` now, on every node: ``{"count", "clients"}``."""
        return await self._request("presence", {"channel": channel})

    async def history(self, channel: str, *, limit: int | None = None, since: int | None = None,
                      reverse: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"channel": channel, "reverse": reverse}
        if limit is not None:
            body["limit"] = limit
        if since is not None:
            body["since"] = since
        reply = await self._request("history", body)
        if self.cipher_for(channel) is not None and isinstance(reply.get("publications"), list):
            opened = [await self._opened(m) for m in reply["publications"]]
            reply["publications"] = [m for m in opened if m is not None]
        return reply

    def cipher_for(self, channel: str) -> e2e.ChannelCipher | None:
        """The cipher of ``channel``: its exact entry, else the first glob that matches."""
        found = self.cipher.get(channel)
        if found is not None or not self.cipher:
            return found
        for pattern, cipher in self.cipher.items():
            if fnmatch.fnmatchcase(channel, pattern):
                return cipher
        return None

    # -- inside -----------------------------------------------------------------------------

    async def _auth(self) -> dict[str, str]:
        token = self._token
        if self._get_token is not None:
            got = self._get_token()
            token = await got if not isinstance(got, str) else got
        auth = {"jwt": str(token)}
        if self.uuid is not None:
            auth["uuid"] = self.uuid
        return auth

    async def _request(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self.sio.call(event, data, namespace=self.namespace,
                                        timeout=self.ack_timeout)
        except socketio.exceptions.TimeoutError:
            raise EchoError("timeout", f"{event}: no answer within {self.ack_timeout} s") from None
        except socketio.exceptions.BadNamespaceError:
            raise EchoError("disconnected", f"{event}: not connected") from None
        return checked(reply, event)

    async def _on_connect(self) -> None:
        if not self._connected_before:
            self._connected_before = True
            await self._set_state({"state": "connected"})
            return
        # after a reconnect: join again from the last positions, in a task (the read loop
        # that delivers the acks must not wait on this handler)
        task = asyncio.get_running_loop().create_task(self._resubscribe())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resubscribe(self) -> None:
        recovered: dict[str, bool] = {}
        for presence in (False, True):
            names = [c for c, p in self.channels.items() if p is presence]
            for start in range(0, len(names), CHANNELS_PER_REQUEST):
                batch = names[start:start + CHANNELS_PER_REQUEST]
                since = {c: self.positions[c] for c in batch if c in self.positions}
                body: dict[str, Any] = {"channels": batch, "withPresence": presence}
                if since:
                    body["since"] = since
                try:
                    reply = await self._request("subscribe", body)
                except EchoError as exc:
                    await self._emit("error", {"code": exc.code,
                                               "message": f"re-subscribe failed: {exc.message}"})
                    continue
                for channel, ok in reply.get("recovered", {}).items():
                    if not ok and self.positions.get(channel) is since.get(channel):
                        self.positions.pop(channel, None)  # live from the ack's position
                    recovered[channel] = bool(ok)
                self._saw_positions(reply)
        await self._set_state({"state": "connected", **({"recovered": recovered} if recovered else {})})

    async def _on_disconnect(self, reason: Any = None) -> None:
        await self._set_state({"state": "disconnected", "reason": str(reason)})

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, dict) and not self._saw(message):
            return  # already seen (same epoch, not a later offset)
        if self.cipher and isinstance(message, dict):
            message = await self._opened(message)
            if message is None:
                return
        await self._emit("message", message)

    async def _opened(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """``message`` with its plaintext (``encrypted: True``), unchanged on a channel without
        a cipher, or None after an ``error`` event when it cannot be opened."""
        channel = message.get("channel")
        cipher = self.cipher_for(channel) if isinstance(channel, str) else None
        if cipher is None or not isinstance(channel, str):
            return message
        try:
            plaintext = e2e.decrypt(message.get("message"),
                                    lambda kid: cipher.key_for(channel, kid),
                                    app=self.app, channel=channel)
        except e2e.DecryptFailed as exc:
            await self._emit("error", {"code": exc.code, "channel": channel,
                                       "id": message.get("id"), "message": exc.reason})
            return None
        return {**message, "message": plaintext, "encrypted": True}

    def _saw(self, message: dict[str, Any]) -> bool:
        channel, offset, epoch = message.get("channel"), message.get("offset"), message.get("epoch")
        if not isinstance(offset, int) or not isinstance(epoch, str) or channel not in self.channels:
            return True
        known = self.positions.get(channel)
        if known and known["epoch"] == epoch and known["offset"] >= offset:
            return False
        self.positions[channel] = {"offset": offset, "epoch": epoch}
        return True

    def _saw_positions(self, reply: dict[str, Any]) -> None:
        for channel, position in (reply.get("positions") or {}).items():
            known = self.positions.get(channel)
            if not (known and known["epoch"] == position["epoch"]
                    and known["offset"] > position["offset"]):
                self.positions[channel] = position

    def _relay(self, event: str) -> Callable[[Any], Awaitable[None]]:
        async def relay(payload: Any) -> None:
            await self._emit(event, payload)
        return relay

    async def _set_state(self, state: dict[str, Any]) -> None:
        self.state = state["state"]
        await self._emit("state", state)

    async def _emit(self, event: str, payload: Any) -> None:
        for listener in list(self._listeners.get(event, [])):
            try:
                result = listener(payload)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # one listener's bug must not stop the others, nor the client
                log.exception("Echo: a %s listener raised", event)

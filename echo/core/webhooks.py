"""Webhooks: what happens in an app, POSTed to its backend, signed, batched, at least once.

Configured per app (``webhooks`` setting): URLs, the events each wants, and a secret. An
event is queued in the broker's durable queue for the app (Redis: a sorted set scored by
when it is due, so a node that dies mid-send leaves it to be sent by another once its lease
ends; memory: in process). Every node sends what is due, batching up to
:data:`BATCH` events per request::

    POST <url>
    content-type: application/json
    echo-webhook-id: <id of this request's batch>
    echo-webhook-timestamp: <unix seconds>
    echo-webhook-signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>

    {"id": ..., "app": ..., "events": [{"id": ..., "event": "subscribe", "ts": ..., ...}]}

Each event's ``id`` stays the same on every retry: a receiver that answered too late gets
it again, and de-duplicates on that id.

A 2xx answer settles it; anything else (or no answer within 10 s) is retried with back-off
(1 s doubling to 5 min) for :data:`MAX_ATTEMPTS` tries, then dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from echo.core import metrics

if TYPE_CHECKING:
    from echo.broker.base import Broker

log = logging.getLogger("echo.webhooks")

EVENTS = frozenset({"connection", "disconnection", "subscribe", "unsubscribe",
                    "channel_occupied", "channel_vacated", "function_error", "publish"})
BATCH = 50
LEASE = 30.0
"""Seconds a claimed delivery is this node's; then it is due again (the node died?)."""
MAX_ATTEMPTS = 12
POLL = 0.2
TIMEOUT = 10.0


class WebhookConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Webhook:
    url: str
    events: frozenset[str]
    secret: str


def parse_webhooks(name: str, raw: Any) -> dict[str, tuple[Webhook, ...]]:
    """``{app: [{url, events, secret}]}`` from a TOML table or JSON (ECHO_WEBHOOKS)."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise WebhookConfigError(f'{name}: expected JSON like {{"app": [{{"url": ..., '
                                     '"events": [...], "secret": ...}]}') from None
    if not isinstance(raw, dict):
        raise WebhookConfigError(f"{name}: expected a table of app = [webhooks]")
    result: dict[str, tuple[Webhook, ...]] = {}
    for app, hooks in raw.items():
        if not isinstance(hooks, list):
            raise WebhookConfigError(f"{name}.{app}: expected a list of webhooks")
        parsed = []
        for index, hook in enumerate(hooks):
            where = f"{name}.{app}[{index}]"
            if not isinstance(hook, dict):
                raise WebhookConfigError(f"{where}: expected {{url, events, secret}}")
            url, events, secret = hook.get("url"), hook.get("events"), hook.get("secret")
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise WebhookConfigError(f"{where}.url: expected an http(s) URL")
            if (not isinstance(events, list) or not events
                    or not all(isinstance(e, str) and e in EVENTS for e in events)):
                raise WebhookConfigError(f"{where}.events: expected a list of "
                                         f"{', '.join(sorted(EVENTS))}")
            if not isinstance(secret, str) or len(secret) < 32:
                raise WebhookConfigError(f"{where}.secret: needs 32 or more characters")
            parsed.append(Webhook(url, frozenset(events), secret))
        result[str(app)] = tuple(parsed)
    return result


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """What ``echo-webhook-signature`` carries; compute it the same way to verify a request."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + digest.hexdigest()


def queue_name(app: str, index: int) -> str:
    return f"webhooks:{app}:{index}"


class Webhooks:
    """Queues an app's events for its webhooks and sends what is due, from every node."""

    def __init__(self, hooks: dict[str, tuple[Webhook, ...]], broker: Broker,
                 on_failure: Any = None) -> None:
        self.hooks = hooks
        self.broker = broker
        self.on_failure = on_failure
        """Called ``(app, url, why)`` when a delivery fails (admin status events)."""
        self._task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._pending: dict[str, list[bytes]] = {}
        """Events on their way into the broker, per queue, in the order they happened."""
        self._enqueuer: asyncio.Task[None] | None = None
        self._sequence = itertools.count()

    def wants(self, app: str, event: str) -> bool:
        return any(event in hook.events for hook in self.hooks.get(app, ()))

    def emit(self, app: str, event: str, details: dict[str, Any]) -> None:
        """Queue ``event`` for every webhook of ``app`` that wants it (never blocks)."""
        for index, hook in enumerate(self.hooks.get(app, ())):
            if event not in hook.events:
                continue
            # "order" first: items due at the same millisecond sort by it, so a receiver
            # gets one node's events in the order they happened
            order = f"{time.time_ns():020d}{next(self._sequence) % 1_000_000:06d}"
            try:  # strict JSON: a receiver in any language must be able to read it
                item = json.dumps({"order": order, "attempt": 0, "event": {
                    **details, "id": secrets.token_hex(12), "event": event, "app": app,
                    "ts": int(time.time() * 1000)}}, default=str, allow_nan=False).encode()
            except ValueError as exc:
                metrics.labelled(metrics.WEBHOOK_FAILURES, "not_queued").inc()
                log.warning("a %s webhook event of %s was not queued: %s", event, app[:80], exc)
                continue
            self._pending.setdefault(queue_name(app, index), []).append(item)
            metrics.WEBHOOK_EVENTS.inc()
        if self._pending and self._enqueuer is None:
            self._enqueuer = asyncio.get_running_loop().create_task(self._enqueue_pending())

    async def _enqueue_pending(self) -> None:
        """One task puts events into the broker, in order, many per call under load."""
        try:
            while self._pending:
                queue, items = next(iter(self._pending.items()))
                del self._pending[queue]
                try:
                    await self.broker.enqueue(queue, items)
                except Exception as exc:
                    metrics.labelled(metrics.WEBHOOK_FAILURES, "not_queued").inc(len(items))
                    log.warning("%d webhook event(s) not queued: %s", len(items), exc)
        finally:
            self._enqueuer = None

    async def flush(self) -> None:
        """Wait until what was emitted is in the broker (shutdown)."""
        while self._enqueuer is not None:
            await asyncio.shield(self._enqueuer)

    async def start(self) -> None:
        if self.hooks:
            self._http = httpx.AsyncClient(timeout=TIMEOUT, trust_env=False)
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), TIMEOUT)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._http is not None:
            await self._http.aclose()

    async def _run(self) -> None:
        """Each webhook is served on its own, so a slow receiver delays only its events."""
        await asyncio.gather(*(self._serve(app, index, hook) for app, hooks in self.hooks.items()
                               for index, hook in enumerate(hooks)))

    async def _serve(self, app: str, index: int, hook: Webhook) -> None:
        while True:
            try:
                sent = await self._send_due(app, queue_name(app, index), hook)
            except Exception as exc:  # the broker is down: try again next round
                log.warning("webhooks of %s: %s", app[:80], exc)
                sent = 0
            if not sent:
                await asyncio.sleep(POLL)

    async def _send_due(self, app: str, queue: str, hook: Webhook) -> int:
        items = await self.broker.claim(queue, BATCH, LEASE)
        if not items:
            return 0
        entries = [json.loads(item) for item in items]
        delivery = hashlib.sha256("".join(e["event"]["id"] for e in entries).encode()).hexdigest()[:32]
        body = json.dumps({"id": delivery, "app": app,
                           "events": [e["event"] for e in entries]}).encode()
        timestamp = str(int(time.time()))
        assert self._http is not None
        why = None
        try:
            # the whole request within TIMEOUT (httpx's own limits are per phase: a receiver
            # trickling bytes would hold the batch past its lease)
            reply = await asyncio.wait_for(self._http.post(hook.url, content=body, headers={
                "content-type": "application/json", "echo-webhook-id": delivery,
                "echo-webhook-timestamp": timestamp,
                "echo-webhook-signature": signature(hook.secret, timestamp, body)}), TIMEOUT)
            if not 200 <= reply.status_code < 300:
                why = f"HTTP {reply.status_code}"
        except TimeoutError:
            why = f"no answer within {TIMEOUT:g} s"
        except httpx.HTTPError as exc:
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
        for item, entry in zip(items, entries, strict=True):
            if why is None:
                await self.broker.settle(queue, item, None, 0)
                continue
            attempt = entry["attempt"] + 1
            if attempt >= MAX_ATTEMPTS:
                await self.broker.settle(queue, item, None, 0)
                metrics.labelled(metrics.WEBHOOK_FAILURES, "dropped").inc()
                continue
            again = json.dumps({**entry, "attempt": attempt}).encode()
            await self.broker.settle(queue, item, again, min(300.0, 2.0 ** (attempt - 1)))
        if why is None:
            metrics.WEBHOOK_DELIVERIES.inc()
        else:
            metrics.labelled(metrics.WEBHOOK_FAILURES, "retried").inc()
            log.warning("webhook %s of %s failed (%s); retrying", hook.url[:200], app[:80], why)
            if self.on_failure is not None:
                self.on_failure(app, hook.url, why)
        return len(items)

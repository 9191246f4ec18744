"""The function pipeline: envelope a message, run its channel's chain, deliver in order.

Chains of different messages run concurrently, yet each channel delivers in publish order:
every message waits for its predecessor's delivery (a chain of futures) before it is
delivered itself. A message whose chain fails, times out or filters is simply skipped in that
order, so it never holds the channel up for longer than its own chain's timeout.

The error policy is "not delivered": the publisher gets an error outcome and the server
reports it to the app's admins; nothing is ever delivered that a function did not return.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from echo.core import metrics
from echo.core.associations import Associations
from echo.core.runners import FunctionError, InvocationContext, Runner

log = logging.getLogger("echo.pipeline")


@dataclass(frozen=True)
class Envelope:
    """A message on its way: ``id`` is unique, ``seq`` counts up per channel, ``ts`` in ms."""

    id: str
    app: str
    channel: str
    seq: int
    ts: int
    uuid: str | None
    message: Any


@dataclass(frozen=True)
class Outcome:
    envelope: Envelope
    delivered: bool
    filtered_by: str | None = None
    error: FunctionError | None = None


class Overloaded(Exception):
    """The channel already has the maximum number of messages in flight."""


Deliver = Callable[[Envelope], Awaitable[None]]
ReportError = Callable[[Envelope, FunctionError], Awaitable[None]]


@dataclass
class _ChannelState:
    tail: asyncio.Future[None] | None = None
    pending: int = 0


class Pipeline:
    def __init__(
        self,
        runner: Runner,
        associations: Callable[[], Associations],
        deliver: Deliver,
        report_error: ReportError,
        *,
        max_pending_per_channel: int = 1000,
    ) -> None:
        self._runner = runner
        self._associations = associations
        self._deliver = deliver
        self._report_error = report_error
        self._max_pending = max_pending_per_channel
        self._channels: dict[tuple[str, str], _ChannelState] = {}
        self._seq: dict[tuple[str, str], int] = {}
        self._node = os.urandom(4).hex()
        self._ids = itertools.count(1)

    def chain_for(self, app: str, channel: str) -> tuple[str, ...]:
        return self._associations().match(app, channel)

    async def publish(self, app: str, channel: str, message: Any, uuid: str | None) -> Outcome:
        """Run ``message`` through the channel's chain and deliver it; raises Overloaded."""
        key = (app, channel)
        state = self._channels.get(key)
        if state is None:
            state = self._channels[key] = _ChannelState()
        if state.pending >= self._max_pending:
            raise Overloaded(
                f"channel {channel!r} has {state.pending} messages in flight; retry shortly"
            )
        seq = self._seq.get(key, 0) + 1
        self._seq[key] = seq
        envelope = Envelope(
            id=f"{self._node}-{next(self._ids)}",
            app=app,
            channel=channel,
            seq=seq,
            ts=int(time.time() * 1000),
            uuid=uuid,
            message=message,
        )
        chain = self.chain_for(app, channel)
        previous, done = state.tail, asyncio.get_running_loop().create_future()
        state.tail = done
        state.pending += 1
        try:
            outcome = await self._run_chain(envelope, chain) if chain else None
            if previous is not None and not previous.done():
                await asyncio.shield(previous)
            if outcome is None:
                outcome = Outcome(envelope, delivered=True)
            if outcome.delivered:
                await self._deliver(outcome.envelope)
            elif outcome.error is not None:
                await self._report_error(envelope, outcome.error)
            return outcome
        finally:
            done.set_result(None)
            state.pending -= 1
            if state.tail is done:
                del self._channels[key]

    async def _run_chain(self, envelope: Envelope, chain: tuple[str, ...]) -> Outcome:
        context = InvocationContext(
            app=envelope.app, channel=envelope.channel, uuid=envelope.uuid, message_id=envelope.id
        )
        value = envelope.message
        for function in chain:
            started = time.perf_counter()
            try:
                value = await self._runner.invoke(function, value, context)
            except Exception as exc:
                if not isinstance(exc, FunctionError):  # a runner bug must not stall the channel
                    log.exception("runner failed on %s", function)
                    exc = FunctionError(function, "failed", f"runner error: {exc!r}")
                metrics.FUNCTION_ERRORS.labels(function, exc.kind).inc()
                return Outcome(envelope, delivered=False, error=exc)
            finally:
                metrics.FUNCTION_DURATION.labels(function).observe(time.perf_counter() - started)
            if value is None:
                return Outcome(envelope, delivered=False, filtered_by=function)
        return Outcome(replace(envelope, message=value), delivered=True)

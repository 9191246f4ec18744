"""The function pipeline: envelope a message, run its channel's chain, deliver in order.

Chains of different messages run concurrently, on one channel as on many, yet an ordered
channel (the default) delivers in publish order: a finished message waits in the channel's
reorder buffer until every earlier one is delivered or skipped, and whoever completes the run
delivers all the consecutive finished messages at once (no event-loop pass per message). The
wait is bounded by the earlier messages' chains, which every runner bounds by its timeouts. A
message whose chain fails, times out or filters is skipped in that order, never waited for.
A channel with ``"ordered": false`` delivers each message as soon as its chain finishes.

Back-pressure: at most ``max_pending_per_channel`` messages of one channel are in flight on
this node (that is the reorder buffer's bound); one more is refused with ``Overloaded`` and
the publisher gets an ``overloaded`` error to retry, so memory never grows without bound.

Per function (``function.toml``): ``retries`` re-runs a function that raised, timed out or
crashed; ``concurrency`` caps its invocations at once; ``on_error`` says what a failure does:
``error`` (default: not delivered, error ack), ``drop`` (not delivered, ack says droppedBy),
``pass`` (the message goes on unchanged). Every failure is reported to the app's admins.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import orjson

from echo.broker.base import Position
from echo.core import metrics
from echo.core.associations import Associations, Rule
from echo.core.envelope import envelope_problem
from echo.core.functions import FunctionCatalog, FunctionConfigError, FunctionSpec
from echo.core.runners import (
    ChainStep,
    FunctionError,
    FunctionErrorKind,
    InvocationContext,
    Runner,
)

log = logging.getLogger("echo.pipeline")

RETRYABLE = frozenset({"raised", "timeout", "crashed", "failed"})


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ cost 3% of a publish
class Envelope:
    """A message on its way: ``id`` is unique, ``seq`` counts up per channel, ``ts`` in ms."""

    id: str
    app: str
    channel: str
    seq: int
    ts: int
    uuid: str | None
    message: Any
    position: asyncio.Future[Position] | None = None
    """A history channel's message: where the broker put it (set by the delivery)."""
    rule: Rule | None = None
    """The channel's rule as matched at publish (delivery need not match it again)."""


@dataclass(slots=True)
class Outcome:
    envelope: Envelope
    delivered: bool
    filtered_by: str | None = None
    dropped_by: str | None = None
    error: FunctionError | None = None


def _check_sealed(function: str, value: Any) -> None:
    """On an encrypted channel a result is an envelope again (its host seals it): plaintext
    from a misconfigured host must not reach subscribers or history."""
    if value is None:
        return
    problem = envelope_problem(value)
    if problem is not None:
        raise FunctionError(function, FunctionErrorKind.BAD_RESULT,
                            f"an encrypted channel's function must return an envelope ({problem})")


class Overloaded(Exception):
    """The channel already has the maximum number of messages in flight."""


Deliver = Callable[[Envelope], Awaitable[None]]
ReportError = Callable[[Envelope, FunctionError, float], Awaitable[None]]


@dataclass(slots=True)
class Hop:
    """One function's part in a message's chain, as a tracer sees it."""

    function: str
    given: Any
    result: Any = None
    error: FunctionError | None = None
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)
    """What the runner could tell: ``logs`` (lines printed or logged), ``traceback``."""


class Tracer(Protocol):
    """Watches messages through the pipeline (the dev inspector); off unless given."""

    def started(self, envelope: Envelope) -> None: ...

    def hop(self, envelope: Envelope, hop: Hop) -> None: ...

    def finished(self, envelope: Envelope, outcome: Outcome) -> None: ...


_SKIPPED = None
"""A finished message with nothing (left) to deliver in order: filtered, failed, unordered."""


@dataclass(slots=True)
class _ChannelState:
    """A channel's messages in flight on this node, and its reorder buffer."""

    key: tuple[str, str]  # (app, channel)
    next_seq: int  # the next sequence number to deliver, or skip
    last_seq: int = 0  # the last one given out
    pending: int = 0
    draining: bool = False
    # finished chains waiting for their turn: seq -> (envelope to deliver or _SKIPPED,
    # the future its publisher waits on, None for the one delivering)
    finished: dict[int, tuple[Envelope | None, asyncio.Future[None] | None]] = field(
        default_factory=dict)


class Pipeline:
    def __init__(
        self,
        runner: Runner,
        catalog: FunctionCatalog,
        associations: Callable[[], Associations],
        deliver: Deliver,
        report_error: ReportError,
        *,
        max_pending_per_channel: int = 1000,
        max_tracked_channels: int = 100_000,
        max_result_bytes: int = 64 * 1024,
    ) -> None:
        self._runner = runner
        self._max_result_bytes = max_result_bytes
        self.tracer: Tracer | None = None
        self._catalog = catalog
        self._associations = associations
        self._deliver = deliver
        self._report_error = report_error
        self._max_pending = max_pending_per_channel
        self._channels: dict[tuple[str, str], _ChannelState] = {}
        # per-channel sequence numbers survive idle periods, but only for the most recently
        # used channels: a client publishing to endless new names cannot grow this forever
        self._seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._max_tracked = max_tracked_channels
        self._limits: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self.idle = asyncio.Event()  # set whenever nothing is in flight (graceful shutdown)
        self.idle.set()
        self._node = os.urandom(4).hex()
        self._ids = itertools.count(1)
        self._drainers: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Messages accepted on this node and not yet delivered or given up."""
        return sum(state.pending for state in self._channels.values())

    def rule(self, app: str, channel: str) -> Rule:
        return self._associations().match(app, channel)

    def may_wait(self, app: str, channel: str, rule: Rule) -> bool:
        """Could publishing on this channel now wait (functions to run, or a predecessor)?"""
        return bool(rule.functions) or (app, channel) in self._channels

    async def publish(self, app: str, channel: str, message: Any, uuid: str | None,
                      rule: Rule | None = None) -> Outcome:
        """Run ``message`` through the channel's chain and deliver it; raises Overloaded."""
        key = (app, channel)
        state = self._channels.get(key)
        if state is not None and state.pending >= self._max_pending:
            raise Overloaded(
                f"channel {channel!r} has {state.pending} messages in flight "
                f"(limit {self._max_pending}); retry shortly"
            )
        previous = self._seq.pop(key, 0)
        if state is not None:  # the reorder buffer needs consecutive numbers while in flight
            previous = max(previous, state.last_seq)
        seq = previous + 1
        self._seq[key] = seq  # now the most recently used
        if len(self._seq) > self._max_tracked:
            self._seq.popitem(last=False)
        if state is None:
            state = self._channels[key] = _ChannelState(key=key, next_seq=seq)
        state.last_seq = seq
        state.pending += 1
        self.idle.clear()
        finished = False
        try:
            if rule is None:  # callers that already matched pass the rule in: one match
                rule = self.rule(app, channel)
            envelope = Envelope(
                id=f"{self._node}-{next(self._ids)}",
                app=app,
                channel=channel,
                seq=seq,
                ts=int(time.time() * 1000),
                uuid=uuid,
                message=message,
                rule=rule,
            )
            tracer = self.tracer
            if tracer is not None:
                tracer.started(envelope)
            if rule.functions:
                outcome = await self._run_chain(envelope, rule.functions)
            else:
                outcome = Outcome(envelope, delivered=True)
            if tracer is not None:
                tracer.finished(envelope, outcome)
            if outcome.delivered and not rule.ordered:
                await self._deliver(outcome.envelope)
                to_deliver = _SKIPPED
            else:
                to_deliver = outcome.envelope if outcome.delivered else _SKIPPED
            finished = True
            await self._in_turn(state, seq, to_deliver)
            return outcome
        finally:
            if not finished:  # cancelled or failed before its turn: never hold up the rest
                self._in_turn_later(state, seq)
            state.pending -= 1
            self._forget_if_done(state)

    async def _in_turn(self, state: _ChannelState, seq: int, envelope: Envelope | None) -> None:
        """Deliver ``envelope`` once every earlier message of the channel is delivered.

        Whoever finds the channel's next message finished delivers it and every consecutive
        one that is finished too, in one go: no event-loop pass per message, and one pass
        writes a burst of deliveries together.
        """
        mine = None
        if seq != state.next_seq or state.draining:
            mine = asyncio.get_running_loop().create_future()
        state.finished[seq] = (envelope, mine)
        if mine is not None:
            await mine  # set (or failed) by the message that delivers it
            return
        await self._drain(state, seq)

    async def _drain(self, state: _ChannelState, own_seq: int | None = None) -> None:
        state.draining = True
        own_error: BaseException | None = None
        try:
            while state.next_seq in state.finished:
                seq = state.next_seq
                envelope, waiter = state.finished.pop(seq)
                state.next_seq = seq + 1
                error = None
                if envelope is not None:
                    try:
                        await self._deliver(envelope)
                    except Exception as exc:  # reported to that message's publisher only
                        error = exc
                if waiter is not None and not waiter.done():
                    if error is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(error)
                elif seq == own_seq and error is not None:
                    own_error = error
        finally:
            state.draining = False
            if state.finished and state.next_seq in state.finished:  # interrupted: resume
                self._in_turn_later(state, None)
        if own_error is not None:
            raise own_error

    def _in_turn_later(self, state: _ChannelState, seq: int | None) -> None:
        """Mark ``seq`` finished with nothing to deliver, and drain from a task if it's due."""
        if seq is not None:
            state.finished.setdefault(seq, (_SKIPPED, None))
        if not state.draining and state.next_seq in state.finished:
            state.draining = True  # reserved for the task, so no one else starts meanwhile
            task = asyncio.get_running_loop().create_task(self._drain_in_task(state))
            self._drainers.add(task)
            task.add_done_callback(self._drainers.discard)

    async def _drain_in_task(self, state: _ChannelState) -> None:
        await self._drain(state)
        self._forget_if_done(state)

    def _forget_if_done(self, state: _ChannelState) -> None:
        """Drop a channel's state once nothing of it is in flight or waiting to be delivered."""
        if state.pending == 0 and not state.finished and self._channels.get(state.key) is state:
            del self._channels[state.key]
        if not self._channels:
            self.idle.set()

    async def _run_chain(self, envelope: Envelope, chain: tuple[str, ...]) -> Outcome:
        encrypted = envelope.rule is not None and envelope.rule.encrypted
        context = InvocationContext(
            app=envelope.app, channel=envelope.channel, uuid=envelope.uuid, message_id=envelope.id,
            encrypted=encrypted,
        )
        value = envelope.message
        tracer = self.tracer
        ahead = await self._run_ahead(chain, value, context) if tracer is None else []
        for index, function in enumerate(chain):
            started = time.perf_counter()
            spec: FunctionSpec | None = None
            hop = Hop(function, value) if tracer is not None else None
            try:
                spec = self._catalog.get(function)
                if index < len(ahead):  # already run, in the chain's one worker call
                    step = ahead[index]
                    started -= step.seconds  # its own time, for the metrics and reports
                    if isinstance(step.result, FunctionError):
                        raise step.result
                    result = step.result
                else:
                    result = await self._invoke(spec, value, context if hop is None
                                                else replace(context, notes=hop.notes))
                # checked before it replaces the input: a refused result must not go on,
                # not even past an on_error = "pass" function
                self.check_result(function, result, encrypted)
                value = result
                if hop is not None and tracer is not None:
                    hop.result, hop.seconds = value, time.perf_counter() - started
                    tracer.hop(envelope, hop)
            except Exception as exc:
                ahead = ahead[:index]  # what followed was computed from a refused result
                error = _as_function_error(function, exc)
                elapsed = time.perf_counter() - started
                if hop is not None and tracer is not None:
                    hop.error, hop.seconds = error, elapsed
                    tracer.hop(envelope, hop)
                metrics.FUNCTION_ERRORS.labels(function, error.kind).inc()
                await self._report_error(envelope, error, elapsed)
                policy = spec.on_error if spec is not None else "error"
                if policy == "pass":
                    continue
                if policy == "drop":
                    return Outcome(envelope, delivered=False, dropped_by=function, error=error)
                return Outcome(envelope, delivered=False, error=error)
            finally:
                metrics.labelled(metrics.FUNCTION_DURATION, function).observe(time.perf_counter() - started)
            if value is None:
                return Outcome(envelope, delivered=False, filtered_by=function)
        return Outcome(replace(envelope, message=value), delivered=True)

    async def _run_ahead(self, chain: tuple[str, ...], event: Any,
                         context: InvocationContext) -> list[ChainStep]:
        """Run a chain of two or more functions in one runner call when the runner can and
        nothing needs a per-function call (retries, a concurrency limit, an encrypted
        channel's trusted host): one worker round trip instead of one per function. The
        results (up to the first None or failure) are then taken hop by hop as if each had
        been invoked, so every policy applies as before. Empty when not possible, or when
        the call as a whole failed (each function is then invoked on its own)."""
        if len(chain) < 2 or context.encrypted:
            return []
        try:
            specs = [self._catalog.get(function) for function in chain]
        except Exception:
            return []
        if any(spec.retries or spec.concurrency for spec in specs) or \
                not self._runner.can_chain(specs):
            return []
        try:
            steps = await self._runner.invoke_chain(specs, event, context)
            metrics.CHAIN_CALLS.inc()
            return steps
        except FunctionError as exc:
            log.info("chain %s failed as a whole (%s); running each function on its own",
                     "+".join(chain), exc.kind)
            return []

    def check_result(self, function: str, value: Any, encrypted: bool) -> None:
        """Raise ``bad_result`` for what a function must not hand on: over the size a publish
        may have, or, on an encrypted channel, anything but an envelope."""
        self._check_size(function, value)
        if encrypted:
            _check_sealed(function, value)

    def _check_size(self, function: str, value: Any) -> None:
        """A result is held to the size a publish is (``max_message_bytes``): a function must
        not hand subscribers what no client could have sent."""
        if value is None or isinstance(value, bool | int | float):
            return
        try:
            size = len(orjson.dumps(value))
        except (TypeError, ValueError) as exc:
            raise FunctionError(function, FunctionErrorKind.BAD_RESULT, f"not JSON: {exc}") from None
        if size > self._max_result_bytes:
            raise FunctionError(function, FunctionErrorKind.BAD_RESULT,
                                f"returned {size} bytes encoded, over max_message_bytes "
                                f"({self._max_result_bytes})")

    async def _invoke(self, spec: FunctionSpec, event: Any, context: InvocationContext) -> Any:
        """One function with its retries and concurrency limit."""
        limit = self._limit(spec)
        for attempt in range(spec.retries + 1):
            try:
                if limit is None:
                    return await self._runner.invoke(spec, event, context)
                async with limit:
                    return await self._runner.invoke(spec, event, context)
            except FunctionError as exc:
                if exc.kind not in RETRYABLE or attempt == spec.retries:
                    raise
                log.info("retrying %s after %s (attempt %d)", spec.name, exc.kind, attempt + 2)
        raise AssertionError("unreachable")

    def _limit(self, spec: FunctionSpec) -> asyncio.Semaphore | None:
        if not spec.concurrency:
            return None
        known = self._limits.get(spec.name)
        if known is None or known[0] != spec.concurrency:  # new, or changed by a hot reload
            known = self._limits[spec.name] = (spec.concurrency, asyncio.Semaphore(spec.concurrency))
        return known[1]


def _as_function_error(function: str, exc: Exception) -> FunctionError:
    if isinstance(exc, FunctionError):
        return exc
    if isinstance(exc, FunctionConfigError):
        return FunctionError(function, FunctionErrorKind.LOAD_FAILED, str(exc))
    log.exception("runner failed on %s", function)  # a runner bug must not stall the channel
    return FunctionError(function, FunctionErrorKind.FAILED, f"runner error: {exc!r}")

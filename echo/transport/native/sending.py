"""Run an ASGI ``send`` without a task when it does not need to wait.

uvicorn's WebSocket ``send()`` only suspends when the connection is paused by flow control
(a client that reads slower than we write). Everything else finishes in one step, so we step
it by hand (:func:`start`) and pay nothing for a task, a queue or a loop wake-up per
recipient. When it does suspend, :class:`Resume` lets a task take over the half-run
coroutine exactly where it stopped: it hands the task what the coroutine is waiting on and
passes back whatever the task sends or throws in (what ``yield from`` does), so the
coroutine never notices the change of driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import Any, Final

DONE: Final[Any] = object()
"""What :func:`start` returns when the send finished without waiting."""

Step = Generator[Any, Any, Any]


def start(awaitable: Awaitable[Any]) -> tuple[Step, Any]:
    """Run ``awaitable`` up to its first suspension: ``(steps, DONE)`` if it finished, else
    ``(steps, what_it_waits_on)`` to give to :class:`Resume`. Its exceptions propagate."""
    steps: Step = awaitable.__await__()
    try:
        return steps, steps.send(None)
    except StopIteration:
        return steps, DONE


class Resume:
    """An awaitable continuing ``steps``, which are suspended on ``pending``."""

    __slots__ = ("pending", "steps")

    def __init__(self, steps: Step, pending: Any) -> None:
        self.steps = steps
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, None]:
        steps, pending = self.steps, self.pending
        while True:
            try:
                sent = yield pending
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:  # a cancellation, forwarded to where it waits
                try:
                    pending = steps.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    pending = steps.send(sent)
                except StopIteration:
                    return

"""Pipeline bookkeeping that a live server cannot show cheaply."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from echo.core.associations import Associations, parse_associations
from echo.core.functions import FunctionCatalog
from echo.core.pipeline import Envelope, Pipeline
from echo.core.runners import Runner

pytestmark = [pytest.mark.anyio, pytest.mark.unit]


class NoFunctions(Runner):
    """These channels have no functions: the pipeline must never call a runner."""

    @classmethod
    def from_settings(cls, settings: Any) -> Runner:
        return cls()

    async def invoke(self, spec: Any, event: Any, context: Any) -> Any:
        raise AssertionError("a channel without functions made a runner round-trip")


async def test_sequence_numbers_are_kept_for_recent_channels_only(tmp_path: Path) -> None:
    delivered: list[Envelope] = []

    async def deliver(envelope: Envelope) -> None:
        delivered.append(envelope)

    async def report(*args: Any) -> None:
        raise AssertionError(args)

    pipeline = Pipeline(NoFunctions(), FunctionCatalog(tmp_path), Associations.empty, deliver,
                        report, max_tracked_channels=4)
    for channel in ("a", "b", "a", "c", "d", "e", "a"):
        await pipeline.publish("app", channel, channel, None)
    assert [(e.channel, e.seq) for e in delivered] == [
        ("a", 1), ("b", 1), ("a", 2), ("c", 1), ("d", 1), ("e", 1), ("a", 3)]
    # a publisher inventing channel names cannot grow the table past its bound
    for n in range(100):
        await pipeline.publish("app", f"spam-{n}", n, None)
    assert len(pipeline._seq) == 4


class Gated(Runner):
    """Each call waits until the test opens its gate: chains finish in the order chosen."""

    def __init__(self) -> None:
        self.gates: dict[Any, asyncio.Future[Any]] = {}

    @classmethod
    def from_settings(cls, settings: Any) -> Runner:
        return cls()

    async def invoke(self, spec: Any, event: Any, context: Any) -> Any:
        gate = self.gates.setdefault(event, asyncio.get_running_loop().create_future())
        return await gate

    def open(self, event: Any, result: Any = "same") -> None:
        gate = self.gates.setdefault(event, asyncio.get_running_loop().create_future())
        gate.set_result(event if result == "same" else result)


def gated_pipeline(tmp_path: Path, deliver: Any) -> tuple[Pipeline, Gated]:
    (tmp_path / "gate").mkdir()
    (tmp_path / "gate" / "handler.py").write_text("def handler(event, context):\n    return event\n")
    associations = parse_associations(
        {"applications": {"app": {"channels": [{"channelName": "c", "functionNames": ["gate"]}]}}})

    async def report(*args: Any) -> None:
        pass

    runner = Gated()
    pipeline = Pipeline(runner, FunctionCatalog(tmp_path), lambda: associations, deliver, report)
    return pipeline, runner


async def until(condition: Any) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


async def test_reorder_buffer_delivers_a_finished_run_at_once_and_survives_cancel_and_errors(
    tmp_path: Path,
) -> None:
    """Chains finish out of order; deliveries leave in publish order. A publish cancelled
    mid-chain is skipped, not waited for; a delivery that fails is that publisher's error
    only; the channel's state is gone once nothing is in flight."""
    delivered: list[Any] = []

    async def deliver(envelope: Envelope) -> None:
        if envelope.message == "explodes":
            raise RuntimeError("socket layer failed")
        delivered.append(envelope.message)

    pipeline, runner = gated_pipeline(tmp_path, deliver)
    messages = ["m0", "m1", "cancelled", "m3", "explodes", "filtered", "m6"]
    tasks = [asyncio.ensure_future(pipeline.publish("app", "c", m, None)) for m in messages]
    await until(lambda: len(runner.gates) == len(messages))
    for message in ("m6", "m3", "explodes", "m1"):
        runner.open(message)
    runner.open("filtered", None)
    await asyncio.sleep(0.05)
    assert delivered == []  # m0 is still running: nothing may overtake it
    tasks[2].cancel()
    runner.open("m0")
    await until(lambda: len(delivered) == 4)
    assert delivered == ["m0", "m1", "m3", "m6"]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert isinstance(outcomes[4], RuntimeError)  # its publisher hears of it, nobody else
    assert outcomes[5].filtered_by == "gate" and not outcomes[5].delivered
    assert [o.envelope.seq for i, o in enumerate(outcomes) if i not in (2, 4)] == [1, 2, 4, 6, 7]
    assert pipeline._channels == {} and pipeline.idle.is_set()
    # the next message after the channel went idle is numbered on, and delivered at once
    last = asyncio.ensure_future(pipeline.publish("app", "c", "m7", None))
    await until(lambda: "m7" in runner.gates)
    runner.open("m7")
    assert (await last).envelope.seq == 8 and delivered[-1] == "m7"

"""Pipeline bookkeeping that a live server cannot show cheaply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from echo.core.associations import Associations
from echo.core.functions import FunctionCatalog
from echo.core.pipeline import Envelope, Pipeline
from echo.core.runners import Runner

pytestmark = pytest.mark.anyio


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

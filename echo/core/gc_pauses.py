"""How long the garbage collector stops the event loop: every pause, by generation, for
``/metrics`` (``echo_gc_pause_seconds`` and the longest one, ``echo_gc_pause_max_seconds``).

A full collection's pause grows with the heap, and while it runs no connection is served;
a connection ramp is where it shows (issue 19 measures it here, with ``gc.callbacks``).
The callback is two clock reads per collection; collections are rare next to messages.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Histogram
from prometheus_client.core import GaugeMetricFamily

PAUSES = Histogram("echo_gc_pause_seconds", "Event-loop pauses of the garbage collector",
                   ["generation"], buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1))


class _Recorder:
    def __init__(self) -> None:
        self.started = 0.0
        self.longest = [0.0, 0.0, 0.0]
        self.installed = False
        self.observers = [PAUSES.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        pause = time.perf_counter() - self.started
        generation = int(info.get("generation", 2))
        self.observers[generation].observe(pause)
        if pause > self.longest[generation]:
            self.longest[generation] = pause

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("echo_gc_pause_max_seconds",
                                   "Longest garbage-collector pause since start", labels=["generation"])
        for generation, longest in enumerate(self.longest):
            family.add_metric([str(generation)], longest)
        yield family


RECORDER = _Recorder()
REGISTRY.register(RECORDER)


def install() -> None:
    """Start timing collections in this process (once)."""
    if not RECORDER.installed:
        RECORDER.installed = True
        gc.callbacks.append(RECORDER)

"""How long the garbage collector stops the event loop: every pause, by generation, for
``/metrics`` (``echo_gc_pause_seconds`` and the longest one, ``echo_gc_pause_max_seconds``).

A full collection's pause grows with the heap, and while it runs no connection is served;
a connection ramp is where it shows (issue 19 measures it here, with ``gc.callbacks``).
The callback is four clock reads per collection; collections are rare next to messages.
Beside each pause (wall clock: what a client waits) the collector's own work is kept (the
thread's CPU time): on a saturated machine the two differ by the time the OS ran something
else in the middle of a collection (``echo_gc_work_max_seconds``).
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
        self.started_cpu = 0.0
        self.longest = [0.0, 0.0, 0.0]
        self.most_work = [0.0, 0.0, 0.0]
        self.installed = False
        self.observers = [PAUSES.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            self.started_cpu = time.thread_time()
            return
        pause = time.perf_counter() - self.started
        work = time.thread_time() - self.started_cpu
        generation = int(info.get("generation", 2))
        self.observers[generation].observe(pause)
        if pause > self.longest[generation]:
            self.longest[generation] = pause
        if work > self.most_work[generation]:
            self.most_work[generation] = work

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("echo_gc_pause_max_seconds",
                                   "Longest garbage-collector pause since start", labels=["generation"])
        for generation, longest in enumerate(self.longest):
            family.add_metric([str(generation)], longest)
        yield family
        work = GaugeMetricFamily("echo_gc_work_max_seconds", "Most CPU time one garbage "
                                 "collection took since start", labels=["generation"])
        for generation, most in enumerate(self.most_work):
            work.add_metric([str(generation)], most)
        yield work


RECORDER = _Recorder()
REGISTRY.register(RECORDER)


def install() -> None:
    """Start timing collections in this process (once)."""
    if not RECORDER.installed:
        RECORDER.installed = True
        gc.callbacks.append(RECORDER)

"""One function hop, measured in-process: the local runner's worker round trip beside the
inline runner, called on the event loop or on a thread pool (which ``runner = "inline"``
should use).

    python -m bench.runner_hop [--calls 3000] [--concurrency 1,50]

The function is bench/project's pass-through ``bench-a``; the event a chat message. Each
way runs ``--calls`` invocations, ``concurrency`` at a time, best of 3; reported as µs of
wall time and of this process's CPU per hop (the worker's own CPU is added for the local
runner, read from /proc). Written to bench/results/runner_hop.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from echo.core.functions import discover
from echo.core.runners import InvocationContext
from echo.emulator.local_runner import LocalRunner
from echo.runners.inline import InlineRunner

PROJECT = Path(__file__).parent / "project"
EVENT = {"text": "see you at the station at eight, by the clock", "user": "ada"}
CONTEXT = InvocationContext(app="bench", channel="f1:x", uuid="u", message_id="m")


def children_cpu() -> float:
    """CPU seconds of this process's live children (the local runner's workers)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == os.getpid():
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def measure(invoke: Any, calls: int, concurrency: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(3):
        wall, cpu, child = time.perf_counter(), time.process_time(), children_cpu()
        for _ in range(calls // concurrency):
            await asyncio.gather(*(invoke() for _ in range(concurrency)))
        done = calls // concurrency * concurrency
        figures = {"wall_us": (time.perf_counter() - wall) / done * 1e6,
                   "cpu_us": (time.process_time() - cpu + children_cpu() - child) / done * 1e6}
        if not best or figures["cpu_us"] < best["cpu_us"]:
            best = figures
    return {k: round(v, 1) for k, v in best.items()}


async def run(calls: int, levels: list[int]) -> dict[str, Any]:
    spec = discover(PROJECT / "functions")["bench-a"]
    local = LocalRunner(PROJECT / "functions", project_dir=PROJECT)
    await local.start()
    inline = InlineRunner()
    handler = inline.handler_of(spec)  # the same handler, for the thread-pool variant

    async def on_thread() -> Any:
        return await asyncio.to_thread(handler, dict(EVENT), None)

    ways = {
        "local worker": lambda: local.invoke(spec, EVENT, CONTEXT),
        "inline, on the loop": lambda: inline.invoke(spec, EVENT, CONTEXT),
        "inline, thread pool": on_thread,
    }
    results: dict[str, Any] = {}
    try:
        await local.invoke(spec, EVENT, CONTEXT)  # the worker is up
        for level in levels:
            for name, invoke in ways.items():
                results[f"{name}, {level} at once"] = await measure(invoke, calls, level)
    finally:
        await local.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,50")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    results = asyncio.run(run(args.calls, levels))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runner_hop.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# One function hop", "", f"{args.calls} calls of a pass-through, best of 3.", "",
             "| way, concurrency | wall µs / hop | CPU µs / hop |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['wall_us']} | {r['cpu_us']} |" for name, r in results.items()]
    (args.out / "runner_hop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

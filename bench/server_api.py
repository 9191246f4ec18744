"""The HTTP server API under load: how fast an app's backend can publish over HTTP.

    python -m bench.server_api [--publishes 5000] [--concurrency 32]

One ``echoctl serve`` (default settings but the bench secret: the backend rate limit is the
one under test), one Socket.IO subscriber on the channel, and an httpx client posting
``/api/bench/publish`` with the app's admin token, ``--concurrency`` requests in flight.
Reports publishes/s, request latency, the server's CPU per publish and whether the
subscriber got every message; writes bench/results/server-api.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import socketio  # type: ignore[import-untyped]

from bench.servers import APP, SECRET, cpu_seconds, make_server, workdir
from echo.core.auth import issue_token


async def measure(url: str, pids: list[int], publishes: int, concurrency: int) -> dict[str, Any]:
    received = 0
    done = asyncio.Event()
    sub = socketio.AsyncClient(reconnection=False)

    async def on_message(_: Any) -> None:
        nonlocal received
        received += 1
        if received >= publishes:
            done.set()

    sub.on("message", on_message, namespace="/" + APP)
    await sub.connect(url, namespaces=["/" + APP], auth={"jwt": issue_token(SECRET, APP)},
                      transports=["websocket"])
    await sub.call("subscribe", {"channels": ["api"]}, namespace="/" + APP)
    headers = {"Authorization": f"Bearer {issue_token(SECRET, APP, admin=True)}"}
    latencies: list[float] = []
    refused = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(publishes):
        queue.put_nowait(n)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"{url}/api/{APP}", headers=headers, limits=limits,
                                 timeout=30, trust_env=False) as http:
        async def worker() -> None:
            nonlocal refused
            while not queue.empty():
                n = queue.get_nowait()
                start = time.perf_counter()
                reply = await http.post("/publish", json={"channel": "api", "message": {"n": n}})
                latencies.append(time.perf_counter() - start)
                refused += reply.status_code != 200

        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        with_delivery = asyncio.wait_for(done.wait(), 30)
        try:
            await with_delivery
        except TimeoutError:
            pass
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
    await sub.disconnect()
    latencies.sort()
    return {
        "publishes": publishes, "concurrency": concurrency, "seconds": round(seconds, 3),
        "publishes_per_s": round(publishes / seconds), "refused": refused,
        "delivered": received, "server_cpu_pct": round(100 * cpu / seconds, 1),
        "server_us_per_publish": round(1e6 * cpu / publishes, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    server = make_server("echo", workdir())
    server.env.pop("ECHO_PUBLISH_RATE", None)  # the defaults are what is measured
    server.start()
    try:
        server.wait_ready()
        result = asyncio.run(measure(server.url, server.pids(), args.publishes, args.concurrency))
    finally:
        server.stop()
    result["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server-api.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join([
        "# Echo bench: the HTTP server API", "",
        f"Run {result['started']}: `POST /api/{APP}/publish` with the app's admin token, "
        f"{args.concurrency} requests in flight, default settings (backend limit 2,000/s, "
        "bursts of 4,000), one Socket.IO subscriber.", "",
        "| publishes | publishes/s | refused | delivered | p50 ms | p99 ms | server CPU % "
        "| µs/publish |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['publishes']} | {result['publishes_per_s']} | {result['refused']} | "
        f"{result['delivered']} | {result['p50_ms']} | {result['p99_ms']} | "
        f"{result['server_cpu_pct']} | {result['server_us_per_publish']} |", ""])
    (args.out / "server-api.md").write_text(table)
    print(table)
    return 0 if result["delivered"] == args.publishes - result["refused"] else 1


if __name__ == "__main__":
    sys.exit(main())

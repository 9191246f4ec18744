"""The HTTP server API under load, beside socket publishing, in one run.

    python -m bench.server_api [--publishes 2000] [--concurrency 32]

One ``echoctl serve`` (default settings but the bench secret: the backend rate limit is
part of what is measured). For 1 and 100 Socket.IO subscribers, the same publishes go out
over ``POST /api/bench/publish`` (admin token, httpx) and from one admin-token Socket.IO
connection, ``--concurrency`` in flight. Reports publishes/s, deliveries/s, latency, the
server's CPU per publish and per delivery; writes bench/results/server-api.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


async def measure(url: str, pids: list[int], publishes: int, concurrency: int,
                  subscribers: int, via: str) -> dict[str, Any]:
    """``publishes`` messages on a fresh channel with ``subscribers`` Socket.IO subscribers,
    published over HTTP (``via="http"``) or from an admin-token socket (``"socket"``)."""
    channel = f"api-{via}-{subscribers}"
    received = 0
    wanted = publishes * subscribers
    done = asyncio.Event()
    namespace = "/" + APP

    async def on_message(_: Any) -> None:
        nonlocal received
        received += 1
        if received >= wanted:
            done.set()

    subs = []
    for _ in range(subscribers):
        sub = socketio.AsyncClient(reconnection=False)
        sub.on("message", on_message, namespace=namespace)
        await sub.connect(url, namespaces=[namespace], auth={"jwt": issue_token(SECRET, APP)},
                          transports=["websocket"])
        await sub.call("subscribe", {"channels": [channel]}, namespace=namespace)
        subs.append(sub)
    admin = issue_token(SECRET, APP, admin=True)
    publisher = socketio.AsyncClient(reconnection=False)
    await publisher.connect(url, namespaces=[namespace], auth={"jwt": admin},
                            transports=["websocket"])
    latencies: list[float] = []
    refused = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(publishes):
        queue.put_nowait(n)
    async with httpx.AsyncClient(base_url=f"{url}/api/{APP}", timeout=30, trust_env=False,
                                 headers={"Authorization": f"Bearer {admin}"},
                                 limits=httpx.Limits(max_connections=concurrency)) as http:
        async def publish(n: int) -> bool:
            body = {"channel": channel, "message": {"n": n}}
            if via == "http":
                return (await http.post("/publish", json=body)).status_code == 200
            ack = await publisher.call("publish", body, namespace=namespace, timeout=30)
            return bool(ack.get("ok"))

        async def worker() -> None:
            nonlocal refused
            while not queue.empty():
                n = queue.get_nowait()
                start = time.perf_counter()
                ok = await publish(n)
                latencies.append(time.perf_counter() - start)
                refused += not ok

        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
    for client in (*subs, publisher):
        await client.disconnect()
    latencies.sort()
    return {
        "via": via, "subscribers": subscribers, "publishes": publishes,
        "concurrency": concurrency, "seconds": round(seconds, 3),
        "publishes_per_s": round(publishes / seconds), "deliveries_per_s": round(received / seconds),
        "refused": refused, "delivered": received, "expected": wanted,
        "server_cpu_pct": round(100 * cpu / seconds, 1),
        "server_us_per_publish": round(1e6 * cpu / publishes, 1),
        "server_us_per_delivery": round(1e6 * cpu / max(1, received), 2),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    server = make_server("echo", workdir())
    server.env.pop("ECHO_PUBLISH_RATE", None)  # the defaults are what is measured
    server.start()
    rows = []
    try:
        server.wait_ready()
        for subscribers in (1, 100):
            for via in ("http", "socket"):
                rows.append(asyncio.run(measure(server.url, server.pids(), args.publishes,
                                                args.concurrency, subscribers, via)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server-api.json").write_text(json.dumps({"started": started, "runs": rows},
                                                         indent=2) + "\n")
    lines = [
        "# Echo bench: the HTTP server API beside socket publishing", "",
        f"Run {started}: one `echoctl serve` on default settings, {args.publishes} publishes "
        f"per row with {args.concurrency} in flight, from `POST /api/{APP}/publish` (admin "
        "token) or from one admin-token Socket.IO connection, to 1 or 100 Socket.IO "
        "subscribers. The Python clients share the 2 cores with the server and limit the rates: "
        "compare the server's CPU per publish and per delivery.", "",
        "| via | subscribers | publishes/s | deliveries/s | refused | delivered | p50 ms | p99 ms "
        "| server CPU % | µs/publish | µs/delivery |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['via']} | {r['subscribers']} | {r['publishes_per_s']} | "
                     f"{r['deliveries_per_s']} | {r['refused']} | {r['delivered']}/{r['expected']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['server_cpu_pct']} | "
                     f"{r['server_us_per_publish']} | {r['server_us_per_delivery']} |")
    table = "\n".join(lines) + "\n"
    (args.out / "server-api.md").write_text(table)
    print(table)
    return 0 if all(r["delivered"] == r["expected"] and not r["refused"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

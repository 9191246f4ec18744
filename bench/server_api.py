"""The HTTP server API under load, beside socket publishing, in one run.

    python -m bench.server_api [--publishes 2000] [--http-publishes 30000] [--concurrency 32]

One ``echoctl serve`` on default settings but the bench secret and the backend rate limit
turned off (``backend_publish_rate`` is 2,000/s per app and node by default: the question is
what one node can take). For 1 and 100 Socket.IO subscribers (python-socketio, counting every
delivery), publishes go out over ``POST /api/bench/publish`` (admin token) from
``bench/node/httpload.mjs`` (Node's http client on keep-alive connections: a Python client
costs more per request than the server does) and from one admin-token Socket.IO connection
(python-socketio), ``--concurrency`` in flight. Reports publishes/s, deliveries/s, latency,
the server's CPU per publish and per delivery; writes bench/results/server-api.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import socketio  # type: ignore[import-untyped]

from bench.servers import APP, NODE_DIR, SECRET, cpu_seconds, ensure_node_modules, make_server, workdir
from echo.core.auth import issue_token


async def measure(url: str, pids: list[int], publishes: int, concurrency: int,
                  subscribers: int, via: str) -> dict[str, Any]:
    """``publishes`` messages on a fresh channel with ``subscribers`` Socket.IO subscribers,
    published over HTTP (``via="http"``) or from an admin-token socket (``"socket"``)."""
    channel = f"api-{via}-{subscribers}"
    received = 0
    wanted = publishes * subscribers
    done = asyncio.Event()
    if not wanted:  # nobody subscribed: the publish path without deliveries
        done.set()
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
    generator_cpu: float | None = None
    if via == "http":
        config = {"url": f"{url}/api/{APP}/publish", "token": admin, "channel": channel,
                  "requests": publishes, "concurrency": concurrency, "timeout": 120}
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        generator = await asyncio.create_subprocess_exec(
            "node", str(NODE_DIR / "httpload.mjs"), json.dumps(config),
            stdout=asyncio.subprocess.PIPE)
        out, _ = await generator.communicate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 30)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
        result = json.loads(out)
        refused = publishes - result["ok"]
        generator_cpu = round(result["gen_cpu_pct"], 1)
        p50, p99 = result["p50_ms"], result["p99_ms"]
        publish_seconds = result["seconds"]
    else:
        seconds, cpu, refused, latencies = await _socket_publishes(
            publisher, namespace, channel, publishes, concurrency, pids, done)
        latencies.sort()
        p50 = 1000 * statistics.median(latencies)
        p99 = 1000 * latencies[int(0.99 * (len(latencies) - 1))]
        publish_seconds = seconds
    for client in (*subs, publisher):
        await client.disconnect()
    return {
        "via": via, "subscribers": subscribers, "publishes": publishes,
        "concurrency": concurrency, "seconds": round(seconds, 3),
        "publishes_per_s": round(publishes / publish_seconds),
        "deliveries_per_s": round(received / seconds),
        "refused": refused, "delivered": received, "expected": wanted,
        "server_cpu_pct": round(100 * cpu / seconds, 1),
        "server_us_per_publish": round(1e6 * cpu / publishes, 1),
        "server_us_per_delivery": round(1e6 * cpu / received, 2) if received else None,
        "p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "generator_cpu_pct": generator_cpu,
    }


async def _socket_publishes(publisher: Any, namespace: str, channel: str, publishes: int,
                            concurrency: int, pids: list[int], done: asyncio.Event
                            ) -> tuple[float, float, int, list[float]]:
    """``publishes`` from one admin socket, ``concurrency`` acks awaited at a time."""
    latencies: list[float] = []
    refused = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(publishes):
        queue.put_nowait(n)

    async def worker() -> None:
        nonlocal refused
        while not queue.empty():
            n = queue.get_nowait()
            start = time.perf_counter()
            ack = await publisher.call("publish", {"channel": channel, "message": {"n": n}},
                                       namespace=namespace, timeout=30)
            latencies.append(time.perf_counter() - start)
            refused += not ack.get("ok")

    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), 30)
    return time.perf_counter() - t0, cpu_seconds(pids) - cpu0, refused, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--publishes", type=int, default=2000)
    parser.add_argument("--http-publishes", type=int, default=30000,
                        help="HTTP publishes to 0 and 1 subscribers (the throughput rows)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ensure_node_modules()
    server = make_server("echo", workdir())
    server.env.pop("ECHO_PUBLISH_RATE", None)  # the defaults are what is measured,
    server.env["ECHO_BACKEND_PUBLISH_RATE"] = "0"  # but for the backend's own limit
    server.start()
    rows = []
    try:
        server.wait_ready()
        for subscribers in (0, 1, 100):
            for via in ("http",) if subscribers == 0 else ("http", "socket"):
                publishes = (args.http_publishes if via == "http" and subscribers < 2
                             else args.publishes)
                rows.append(asyncio.run(measure(server.url, server.pids(), publishes,
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
        f"Run {started} on {os.cpu_count()} cores: one `echoctl serve` on default settings but "
        "`backend_publish_rate` off (2,000/s per app and node by default), "
        f"{args.http_publishes} HTTP publishes to 0 and 1 subscribers and {args.publishes} in "
        f"the other rows, {args.concurrency} in flight, from `POST /api/{APP}/publish` (admin "
        "token; Node http client, bench/node/httpload.mjs) or from one admin-token Socket.IO "
        "connection (python-socketio), to 1 or 100 python-socketio subscribers. The clients "
        "share the 2 cores with the server: the 100-subscriber rows and the socket rows are "
        "limited by the Python clients; compare the server's CPU per publish and per delivery.",
        "",
        "| via | subscribers | publishes/s | deliveries/s | refused | delivered | p50 ms | p99 ms "
        "| server CPU % | µs/publish | µs/delivery | gen CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['via']} | {r['subscribers']} | {r['publishes_per_s']} | "
                     f"{r['deliveries_per_s']} | {r['refused']} | {r['delivered']}/{r['expected']} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r['server_cpu_pct']} | "
                     f"{r['server_us_per_publish']} | {r['server_us_per_delivery'] or '-'} | "
                     f"{r['generator_cpu_pct'] if r['generator_cpu_pct'] is not None else ''} |")
    table = "\n".join(lines) + "\n"
    (args.out / "server-api.md").write_text(table)
    print(table)
    return 0 if all(r["delivered"] == r["expected"] and not r["refused"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

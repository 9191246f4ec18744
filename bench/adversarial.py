"""A bounded adversarial soak: normal clients beside hostile ones, on one node's defaults.

    python -m bench.adversarial [--seconds 20] [--subscribers 20] [--rate 50]

One ``echoctl serve`` with its default limits (unlike the other scenarios, nothing is
raised). Normal clients: ``--subscribers`` python-socketio subscribers of ``plain`` and one
publisher at ``--rate`` messages/s, each message stamped, so every delivery's latency is
known and every loss counted. First a quiet phase, then the same with hostile clients in a
separate process running every attack of issue 17 at once: two publish floods, half-sent
HTTP requests (slowloris), garbage and oversize Engine.IO frames, CONNECTs to huge
namespaces and to many apps, attachment-count bombs. Reported: delivery p50/p99 and losses
in both phases and the hostile ÷ quiet p99 ratio (the goal: nothing lost, ratio ≤ 2), in
bench/results/adversarial.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import socketio

from bench.servers import SECRET, free_port, make_project, token, workdir

APP = "bench"
WS = "/socket.io/?EIO=4&transport=websocket"


def start_server(work: Path, project: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    if project is None:
        project = work / "project"
        if not project.exists():
            make_project(work)
    port = free_port()
    log = (work / f"adversarial-{port}.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "echo", "serve", "--project", str(project), "--port", str(port)],
        env={**os.environ, "ECHO_SECRET": SECRET, "ECHO_LOG_LEVEL": "warning"},
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


async def bench_client(url: str, channel: str | None = None,
                       on_message: Any = None) -> socketio.AsyncClient:
    """A python-socketio client of the bench app, subscribed to ``channel`` if given."""
    client = socketio.AsyncClient(reconnection=False)
    if on_message is not None:
        client.on("message", on_message, namespace="/" + APP)
    await client.connect(url, namespaces=["/" + APP], auth={"jwt": token(APP)},
                         transports=["websocket"], wait_timeout=10)
    if channel is not None:
        await client.call("subscribe", {"channels": [channel]}, namespace="/" + APP)
    return client


async def normal_phase(port: int, seconds: float, subscribers: int, rate: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    received: dict[int, int] = {}
    clients = []

    def on_message(message: Any) -> None:
        body = message.get("message") if isinstance(message, dict) else None
        sent = body.get("t") if isinstance(body, dict) else None  # (the flood's are strings)
        if isinstance(sent, float):
            latencies.append(time.time() - sent)
            number = message["message"]["n"]
            received[number] = received.get(number, 0) + 1

    for _ in range(subscribers):
        clients.append(await bench_client(url, "plain", on_message))
    publisher = await bench_client(url)
    refused = 0
    sent = 0
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        ack = await publisher.call("publish", {"channel": "plain", "message": {
            "t": time.time(), "n": sent}}, namespace="/" + APP, timeout=10)
        refused += not ack.get("ok")
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    await asyncio.sleep(1)
    for client in [*clients, publisher]:
        await client.disconnect()
    delivered = sum(received.values())
    latencies.sort()
    return {"published": sent, "refused": refused, "expected": sent * subscribers,
            "delivered": delivered, "lost": sent * subscribers - delivered,
            "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2) if latencies else None}


# -- the hostile process ------------------------------------------------------------------

async def _flood(port: int, stop: float) -> None:
    import websockets

    async with websockets.connect(f"ws://127.0.0.1:{port}{WS}") as ws:
        await ws.recv()
        await ws.send(f"40/{APP}," + json.dumps({"jwt": token(APP)}))
        await ws.recv()
        frame = f'42/{APP},["publish",{{"channel":"plain","message":"flood"}}]'
        while time.monotonic() < stop:
            for _ in range(200):
                await ws.send(frame)
            await asyncio.sleep(0)


async def _slowloris(port: int, stop: float) -> None:
    held = []
    while time.monotonic() < stop:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            held.append(writer)
        except OSError:
            pass
        held = [w for w in held if not w.is_closing()][-300:]
        await asyncio.sleep(0.01)
    for writer in held:
        writer.close()


async def _garbage(port: int, stop: float) -> None:
    import websockets

    frames = ["4x", "40/" + "w" * 32_000 + ",{}", "459999999999-/bench,[1]", "42/bench,[",
              "4" * 5000, '40/bench,{"jwt": 5}'] + [f"40/app{n},{{}}" for n in range(20)]
    while time.monotonic() < stop:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}{WS}", max_size=None) as ws:
                await ws.recv()
                for frame in frames:
                    await ws.send(frame)
        except Exception:
            pass
        await asyncio.sleep(0.02)


ATTACKS = {"flood": _flood, "slowloris": _slowloris, "garbage": _garbage}


def hostile(port: int, seconds: float, attacks: list[str]) -> None:
    async def run() -> None:
        stop = time.monotonic() + seconds
        await asyncio.gather(*(ATTACKS[name](port, stop) for name in attacks),
                             return_exceptions=True)
    asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--rate", type=int, default=50)
    parser.add_argument("--attacks", default="flood,flood,slowloris,garbage",
                        help=f"comma-separated, of {', '.join(ATTACKS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    attacks = [a for a in args.attacks.split(",") if a]
    server, port = start_server(workdir())
    try:
        quiet = asyncio.run(normal_phase(port, args.seconds, args.subscribers, args.rate))
        attacker = multiprocessing.Process(target=hostile, args=(port, args.seconds + 3, attacks))
        attacker.start()
        time.sleep(1)  # the attacks are running
        attacked = asyncio.run(normal_phase(port, args.seconds, args.subscribers, args.rate))
        attacker.join(30)
        alive = server.poll() is None
    finally:
        server.kill()
        server.wait()
    ratio = (attacked["p99_ms"] / quiet["p99_ms"]) if quiet["p99_ms"] and attacked["p99_ms"] else None
    result = {"quiet": quiet, "attacked": attacked, "p99_ratio": ratio and round(ratio, 2),
              "server_survived": alive, "seconds": args.seconds, "attacks": attacks,
              "subscribers": args.subscribers, "rate": args.rate}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adversarial.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Adversarial soak", "", f"{args.subscribers} subscribers, {args.rate} msg/s, "
             f"{args.seconds:g} s per phase, one `serve` node on its default limits; attacks: "
             f"{', '.join(attacks)}.", "",
             "| phase | published | delivered / expected | lost | p50 ms | p99 ms |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, phase in (("quiet", quiet), ("under attack", attacked)):
        lines.append(f"| {name} | {phase['published']} | {phase['delivered']} / "
                     f"{phase['expected']} | {phase['lost']} | {phase['p50_ms']} | {phase['p99_ms']} |")
    lines += ["", f"p99 under attack ÷ quiet: **{result['p99_ratio']}**; the server "
              f"{'survived' if alive else 'DIED'}."]
    (args.out / "adversarial.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if alive and attacked["lost"] == 0 and quiet["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

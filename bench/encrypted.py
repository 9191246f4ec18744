"""An encrypted channel beside a plain one, in one run: the server's cost per delivery, and the
clients' cost to seal and open a message.

    python -m bench.encrypted [--seconds 8] [--subscribers 20] [--rate 200] [--rounds 2]

One ``echoctl serve`` (on its defaults, rate limit off), ``--subscribers`` raw python-socketio
subscribers of both channels (they count, they do not decrypt: the server's side only), one
publisher at ``--rate`` messages/s. Phases alternate plain / encrypted for ``--rounds``
rounds, with messages of the same encoded size (a chat message, and its envelope padded to
match). Reported per phase: deliveries/s and the server's CPU µs per delivery (from
``/proc/PID/stat``), best of the rounds; and, in-process, µs to seal and to open one chat
message with :mod:`echo.sdk.e2e` (the clients' cost). Written to
bench/results/encrypted.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from bench.adversarial import APP, bench_client, start_server
from bench.servers import make_project, workdir
from echo.sdk import e2e

KEY = os.urandom(32)
CHAT = {"text": "see you at the station at eight, by the clock", "user": "ada"}


def sealed_for(channel: str) -> dict[str, Any]:
    return e2e.encrypt(CHAT, KEY, app=APP, channel=channel, kid="k1")


def plain_like(envelope: dict[str, Any]) -> dict[str, Any]:
    """A plaintext message as long, encoded, as the envelope: the same bytes to relay."""
    size = len(json.dumps(envelope, separators=(",", ":")))
    body = {"text": ""}
    body["text"] = "x" * (size - len(json.dumps(body, separators=(",", ":"))))
    return body


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def phase(port: int, pid: int, channel: str, message: Any, seconds: float,
                subscribers: int, rate: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}"
    counts = [0]
    clients = []

    def on_message(_: Any) -> None:
        counts[0] += 1

    for _ in range(subscribers):
        clients.append(await bench_client(url, channel, on_message))
    publisher = await bench_client(url)
    refused = 0
    sent = 0
    cpu_before, started = cpu_seconds(pid), time.monotonic()
    while time.monotonic() - started < seconds:
        ack = await publisher.call("publish", {"channel": channel, "message": message},
                                   namespace="/" + APP, timeout=10)
        refused += not ack.get("ok")
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / rate - time.monotonic()))
    await asyncio.sleep(0.5)
    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu_before
    for client in [*clients, publisher]:
        await client.disconnect()
    delivered = counts[0]
    return {"channel": channel, "published": sent, "refused": refused, "delivered": delivered,
            "lost": sent * subscribers - delivered,
            "deliveries_per_s": round(delivered / elapsed),
            "server_cpu_us_per_delivery": round(cpu / delivered * 1e6, 2) if delivered else None}


def client_costs() -> dict[str, float]:
    envelope = sealed_for("secret")
    runs = 2000
    seal = timeit.timeit(lambda: sealed_for("secret"), number=runs) / runs
    opened = timeit.timeit(lambda: e2e.decrypt(envelope, KEY, app=APP, channel="secret"),
                           number=runs) / runs
    return {"seal_us": round(seal * 1e6, 1), "open_us": round(opened * 1e6, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--subscribers", type=int, default=20)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = workdir()
    project = make_project(work, name="project-encrypted")
    associations = project / "associations.json"
    data = json.loads(associations.read_text())
    data["applications"][APP]["channels"] += [{"channelName": "secret", "encrypted": True}]
    associations.write_text(json.dumps(data, indent=2))
    (project / "echo.toml").write_text((project / "echo.toml").read_text()
                                       + "\npublish_rate = 0\n")
    server, port = start_server(work, project)
    envelope = sealed_for("secret")
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "encrypted": []}
    try:
        for round_number in range(args.rounds):
            order = [("plain", "plain", plain_like(envelope)), ("encrypted", "secret", envelope)]
            for name, channel, message in (order if round_number % 2 == 0 else order[::-1]):
                runs[name].append(asyncio.run(phase(port, server.pid, channel, message,
                                                    args.seconds, args.subscribers, args.rate)))
    finally:
        server.kill()
        server.wait()
    best = {name: min(rs, key=lambda r: r["server_cpu_us_per_delivery"] or 1e9)
            for name, rs in runs.items()}
    ratio = (best["encrypted"]["server_cpu_us_per_delivery"]
             / best["plain"]["server_cpu_us_per_delivery"])
    costs = client_costs()
    result = {"best": best, "rounds": runs, "encrypted_over_plain_cpu": round(ratio, 3),
              "clients": costs, "message_bytes": len(json.dumps(envelope, separators=(",", ":"))),
              "subscribers": args.subscribers, "rate": args.rate, "seconds": args.seconds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encrypted.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Encrypted channel vs plain", "",
             f"{args.subscribers} subscribers, {args.rate} msg/s, {args.seconds:g} s per phase, "
             f"best of {args.rounds}; messages of {result['message_bytes']} bytes encoded.", "",
             "| channel | deliveries/s | lost | server CPU µs / delivery |", "|---|---:|---:|---:|"]
    for name in ("plain", "encrypted"):
        row = best[name]
        lines.append(f"| {name} | {row['deliveries_per_s']} | {row['lost']} | "
                     f"{row['server_cpu_us_per_delivery']} |")
    lines += ["", f"Server CPU per delivery, encrypted ÷ plain: **{result['encrypted_over_plain_cpu']}**.",
              f"Clients (Python, `cryptography`): seal {costs['seal_us']} µs, open "
              f"{costs['open_us']} µs per chat message."]
    (args.out / "encrypted.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(best[n]["lost"] == 0 and best[n]["refused"] == 0 for n in best) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Recovery after a node restart: many clients come back at once and ask for what they missed.

    python -m bench.recovery [--clients 1000] [--messages 100]

Two ``echoctl serve`` nodes on one private Redis; ``bench/node/recovery.mjs`` subscribes
``--clients`` connections to a history channel on node A. Node A is SIGKILLed; ``--messages``
messages are published through node B; node A is started again and every client reconnects
to it at once, subscribing with its last position. Reported: the time until every client
holds every missed message (checked: exactly once, in order, ``recovered: true``), node A's
CPU over that time, and the round trips of a probe client publishing on node A meanwhile (a
stalled node shows there). Results go to bench/results/recovery.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.servers import NODE_DIR, Redis, cpu_seconds, ensure_node_modules, make_server, token, workdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    ensure_node_modules()
    work = workdir()
    redis = Redis(work).start()
    a, b = (make_server("echo", work, redis.url, i) for i in range(2))
    config = {"urls": [a.url, b.url], "token": token(), "clients": args.clients,
              "messages": args.messages, "deadline": 300}
    result: dict[str, Any] = {"clients": args.clients, "messages": args.messages}
    cpu: dict[str, float] = {}
    loadgen: subprocess.Popen[str] | None = None
    try:
        for server in (a, b):
            server.start()
        for server in (a, b):
            server.wait_ready()
        loadgen = subprocess.Popen(["node", str(NODE_DIR / "recovery.mjs"), json.dumps(config)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   cwd=NODE_DIR)
        assert loadgen.stdin is not None and loadgen.stdout is not None
        for line in loadgen.stdout:
            event = json.loads(line)
            phase = event.get("phase")
            print(line.strip(), flush=True)
            if phase == "subscribed":
                a.kill()
            elif phase == "published":
                a.start()
                a.wait_ready()
                cpu["before"] = cpu_seconds(a.pids())
                loadgen.stdin.write("go\n")
                loadgen.stdin.flush()
            elif phase == "recovered":
                cpu["after"] = cpu_seconds(a.pids())
            elif event.get("type") == "result":
                result = event
                break
    finally:
        if loadgen is not None:
            loadgen.kill()
        for server in (a, b):
            server.stop()
        redis.stop()
    if "after" in cpu and result.get("seconds"):
        result["node_cpu_s"] = round(cpu["after"] - cpu["before"], 3)
        result["node_cpu_pct"] = round(100 * result["node_cpu_s"] / result["seconds"], 1)
        delivered = result.get("delivered") or 0
        result["us_per_recovered_message"] = (round(1e6 * result["node_cpu_s"] / delivered, 2)
                                              if delivered else None)
    result["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "recovery.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result.get("ok") else 1


def markdown(r: dict[str, Any]) -> str:
    probe, client = r.get("probe_ms") or {}, r.get("client_ms") or {}
    return "\n".join([
        "# Echo bench: recovery after a node restart",
        "",
        f"Run {r.get('started')}: {r.get('clients')} clients on node A of 2 (one Redis), "
        f"node A SIGKILLed, {r.get('messages')} messages published through node B, node A "
        "restarted, every client reconnecting to it at once with its last position.",
        "",
        "| clients | messages each | all recovered in s | complete | recovered | not recovered "
        "| wrong order or count | per client p50 / p99 ms | node A CPU % | µs per recovered message "
        "| probe round trip p50 / p99 / max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
        f"| {r.get('clients')} | {r.get('messages')} | {r.get('seconds', 0):.2f} | {r.get('complete')} "
        f"| {r.get('recovered')} | {r.get('not_recovered')} | {r.get('wrong_order_or_count')} "
        f"| {client.get('p50', 0):.0f} / {client.get('p99', 0):.0f} | {r.get('node_cpu_pct')} "
        f"| {r.get('us_per_recovered_message')} "
        f"| {probe.get('p50', 0):.1f} / {probe.get('p99', 0):.1f} / {probe.get('max', 0):.1f} |",
        "",
    ]) + ("" if r.get("ok") else f"\n**Failed**: {json.dumps(r)[:2000]}\n")


if __name__ == "__main__":
    sys.exit(main())

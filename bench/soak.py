"""A bounded soak: many connections, steady publishing, Echo's memory sampled throughout.

    python -m bench.soak [--connections 1000] [--minutes 3] [--rate 200] [--history]

One ``echoctl serve`` (through one echo function on half the channels), the Node load
generator in rate mode for the whole time, and the server's RSS sampled every 5 s. It
reports RSS per connection and the growth over the steady part (the second half of the
run), and exits non-zero if messages were lost or memory kept growing: more than
``--max-growth-mb`` between the first and last quarter of the second half. ``--history``
puts every channel on a history rule (100 messages, 600 s), the function half included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from bench.run import run_loadgen
from bench.servers import make_server, rss_mb, token, workdir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--rate", type=int, default=200, help="messages/s in total")
    parser.add_argument("--max-growth-mb", type=float, default=10.0)
    parser.add_argument("--history", action="store_true",
                        help="every channel keeps history (bench/servers.py HISTORY_RULES)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    work = workdir()
    server = make_server("echo", work)
    server.start()
    server.wait_ready()
    channels = 10
    subs = max(1, args.connections // channels - 1)
    plain, through = ("h:", "hf1:") if args.history else ("", "f1:")
    config = {
        "urls": [server.url],
        "namespace": "/bench",
        "token": token(),
        # even channels plain, odd ones ("f1:*") through one function, bench-a: see bench/project
        "channels": [{"name": (plain if n % 2 == 0 else through) + f"soak-{n}", "subs": subs,
                      "pubs": 1} for n in range(channels)],
        "mode": "rate",
        "rate": args.rate,
        "warmup": 5,
        "measure": int(args.minutes * 60),
        "drain": 30,
        "deadline": int(args.minutes * 60) + 180,
    }
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(5):
            samples.append((time.monotonic(), rss_mb([server.process.pid])))

    sampler = threading.Thread(target=sample, daemon=True)
    phases: dict[str, float] = {}
    try:
        sampler.start()
        result = run_loadgen(config, config["deadline"],
                             lambda phase, _: phases.setdefault(phase, time.monotonic()),
                             work / "soak-loadgen.log")
    finally:
        stop.set()
        sampler.join(10)
        server.stop()

    start, end = phases.get("measure_start"), phases.get("measure_end")
    steady = [rss for t, rss in samples if start and end and (start + end) / 2 <= t <= end]
    connections = channels * (subs + 1)
    report = {
        "connections": connections,
        "minutes": args.minutes,
        "rate": args.rate,
        "history": args.history,
        "channels": [c["name"] for c in config["channels"]],
        "ok": bool(result.get("ok")),
        "lost": result.get("lost"),
        "delivered": result.get("delivered"),
        "loadgen": {k: v for k, v in result.items() if k not in ("hist", "latency")},
        "rss_samples_mb": [round(rss, 1) for _, rss in samples],
    }
    if len(steady) >= 4:
        quarter = max(1, len(steady) // 4)
        first, last = statistics.mean(steady[:quarter]), statistics.mean(steady[-quarter:])
        report.update(rss_steady_mb=round(statistics.mean(steady), 1),
                      # the whole process's RSS over the connections, baseline included
                      rss_kb_per_connection=round(statistics.mean(steady) * 1024 / connections, 1),
                      growth_mb=round(last - first, 2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples_mb"}, indent=2))
    if not report["ok"] or report.get("lost"):
        print("soak FAILED: messages lost or the load generator failed", file=sys.stderr)
        return 1
    if report.get("growth_mb", 0) > args.max_growth_mb:
        print(f"soak FAILED: RSS grew {report['growth_mb']} MB in the steady half", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

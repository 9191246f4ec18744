"""Profile Echo's hot path under one bench scenario with py-spy.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.pyspy --scenario fanout-1000 --seconds 15

Starts ``echoctl serve`` as the bench does, drives it with the load generator, and while the
measured window runs records (1) a flame graph, ``bench/results/profile-<scenario>.svg``,
then (2) raw stacks, summarised in ``bench/results/profile-<scenario>.txt``: the frames where
the samples are (self %) and the functions they pass through (inclusive %).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

from bench.cli import raise_fd_limit
from bench.report import echo_source
from bench.run import run_loadgen
from bench.scenarios import full
from bench.servers import BENCH, ensure_node_modules, make_server, snapshot_echo, token, workdir

_LOCATION = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _frame(raw: str) -> str:
    """``emit (socketio/async_server.py:123)`` -> ``emit (socketio/async_server.py)``."""
    match = _LOCATION.match(raw.strip())
    if not match:
        return raw.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarise(raw_path: Path, top: int = 30) -> str:
    self_counts: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "no samples\n"
    lines = [f"{total} samples (CPU-active only)", "", "self %  frame"]
    lines += [f"{100 * n / total:6.1f}  {name}" for name, n in self_counts.most_common(top)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:6.1f}  {name}" for name, n in inclusive.most_common(top * 2)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pyspy", description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="fanout-1000")
    parser.add_argument("--seconds", type=float, default=15, help="length of each recording")
    parser.add_argument("--rate", type=int, default=100, help="samples per second")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--echo-ref", default=None, metavar="REF",
                        help="profile Echo as committed at this git ref instead of the working tree")
    parser.add_argument("--native", action="store_true",
                        help="include C frames (uvloop, the write syscall) in the raw summary")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    scenario = next((s for s in full() if s.name == args.scenario), None)
    if scenario is None or scenario.nodes != 1:
        print(f"no single-node scenario {args.scenario!r}", file=sys.stderr)
        return 2
    ensure_node_modules()
    raise_fd_limit()
    scenario = replace(scenario, warmup=2, measure=2 * args.seconds + 4, drain=10)
    work = workdir()
    snapshot = snapshot_echo(args.echo_ref, work) if args.echo_ref else None
    source = echo_source(args.echo_ref, snapshot)
    version = f"{source['commit']}{'-dirty' if source['dirty'] else ''}"
    stem = f"profile-{scenario.name}" + ("-native" if args.native else "") + f"-{version}"
    svg = args.out / f"{stem}.svg"
    raw = work / "profile.raw"
    text = args.out / f"{stem}.txt"
    server = make_server("echo", work)
    server.start()
    server.wait_ready()
    args.out.mkdir(parents=True, exist_ok=True)
    pid = str(server.process.pid)
    # --gil: only samples of the thread holding the GIL, i.e. the event loop at work (an
    # idle thread-pool thread would otherwise show up as busy)
    common = ["--pid", pid, "--duration", str(int(args.seconds)), "--rate", str(args.rate), "--gil"]

    def record() -> None:
        subprocess.run([spy, "record", *common, "-o", str(svg)], check=False,
                       stdout=subprocess.DEVNULL)
        native = ["--native"] if args.native else []
        subprocess.run([spy, "record", *common, *native, "--format", "raw", "-o", str(raw)],
                       check=False, stdout=subprocess.DEVNULL)

    recorder = threading.Thread(target=record)

    def on_phase(phase: str, line: dict) -> None:
        if phase == "measure_start":
            recorder.start()

    try:
        result = run_loadgen(scenario.loadgen_config([server.url], token()), scenario.deadline,
                             on_phase, work / "loadgen.log")
    finally:
        if recorder.is_alive() or recorder.ident:
            recorder.join()
        server.stop()
    summary = (f"py-spy on `echoctl serve` (Echo {source['commit']}"
               f"{' + uncommitted changes' if source['dirty'] else ''}, echo/ sha256 "
               f"{source['echo_sha256']}), scenario {scenario.name}: "
               f"{result.get('deliveries_per_s', result.get('deliveriesPerSec', 0)):,.0f} deliveries/s "
               f"while recording, lost {result.get('lost')}\n\n")
    summary += summarise(raw) if raw.exists() else "no raw profile recorded\n"
    text.write_text(summary)
    print(summary)
    print(f"wrote {svg} and {text}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: run a profile, print the table, write bench/results/<profile>.{json,md}.

Exit status: 0 when every scenario ran and Echo lost nothing; 1 when an Echo run lost messages,
had publishes refused or failed (connections refused or dropped, the server died); 2 when a
server (Echo's or a baseline's) failed to start. "Echo" is the Echo being built (``echo``,
``echo-pysio``); a baseline that loses messages, Echo before (``echo@REF``) included, is
reported (marked in the table) but does not fail the run.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from bench import report
from bench.run import best, run_scenario
from bench.scenarios import PROFILES, Scenario
from bench.servers import (
    BENCH,
    TARGETS,
    Redis,
    ServerFailed,
    ensure_node_modules,
    family,
    is_product,
    known,
    label,
    ref_of,
    snapshot_echo,
    workdir,
)

console = Console(stderr=True)


def raise_fd_limit(wanted: int = 65536) -> int:
    """10,000 connections need 10,000+ descriptors in the generator and in the server."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--only", action="append", default=[],
                        help="run only the scenario of this name or glob, e.g. 'fanout-*' (repeatable)")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help="comma-separated list of echo, echo-pysio (Echo on its python-socketio "
                             "transport), echo@REF (Echo as committed at a git ref), node, pysio; "
                             "default echo,node,pysio")
    parser.add_argument("--baseline-ref", default=None, metavar="REF",
                        help="also measure Echo as committed at REF (target echo@REF, 'Echo before') "
                             "in the same rounds, and report after / before ratios")
    parser.add_argument("--out", type=Path, default=BENCH / "results",
                        help="folder for <profile>.json and <profile>.md")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (server logs)")
    parser.add_argument("--echo-ref", default=None, metavar="REF",
                        help="measure Echo as committed at this git ref (e.g. HEAD) instead of "
                             "the working tree, which someone may be editing")
    parser.add_argument("--measure", type=float, default=None, metavar="SECONDS",
                        help="override every scenario's measured window (e.g. 2 for a smoke run)")
    parser.add_argument("--warmup", type=float, default=None, metavar="SECONDS",
                        help="override every scenario's warm-up")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="override every scenario's number of rounds (best of N)")
    parser.add_argument("--name", default=None, metavar="STEM",
                        help="write bench/results/STEM.{json,md} instead of <profile>[-partial]")
    return parser.parse_args(argv)


def pick_targets(args: argparse.Namespace) -> list[str]:
    """The targets in measuring order, ``echo@REF`` of ``--baseline-ref`` after the Echo ones."""
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.baseline_ref and f"echo@{args.baseline_ref}" not in targets:
        last_echo = max((i for i, t in enumerate(targets) if family(t) == "echo"), default=-1)
        targets.insert(last_echo + 1, f"echo@{args.baseline_ref}")
    return list(dict.fromkeys(targets))


def override(scenarios: list[Scenario], args: argparse.Namespace) -> list[Scenario]:
    changes: dict[str, Any] = {}
    if args.measure is not None:
        changes["measure"] = max(args.measure, 0.5)
    if args.warmup is not None:
        changes["warmup"] = max(args.warmup, 0.0)
    if args.rounds is not None:
        changes["rounds"] = min(max(args.rounds, 1), 10)
    return [replace(s, **changes) for s in scenarios] if changes else scenarios


def summary(row: dict[str, Any]) -> str:
    who = label(row["target"]) + (f" x{row['nodes']}" if row.get("nodes", 1) > 1 else "")
    if not row.get("ok"):
        head = f"[red]✗ {row['scenario']} · {who}: {row.get('error')}[/]"
        if "server_cpu_pct" not in row:
            return head
    else:
        head = f"[green]✓[/] {row['scenario']} · {who}"
    if row.get("kind") == "idle":
        return (f"{head}: {row['connections']:,} conns, {row['rss_per_conn_kb']:.1f} kB/conn, "
                f"server {row['server_cpu_pct']:.0f}% CPU")
    p99 = row.get("p99_ms")
    quiet = row.get("quiet_cpu_pct")
    return (f"{head}: {row['deliveries_per_s']:,.0f} deliveries/s, p99 "
            f"{'-' if p99 is None else f'{p99:.1f}'} ms, lost {row.get('lost')}, server "
            f"{row['server_cpu_pct']:.0f}% CPU"
            + (f" (quiet node {quiet:.1f}%)" if quiet is not None else "")
            + f", gen {row.get('gen_cpu_pct') or 0:.0f}%")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = pick_targets(args)
    unknown = [t for t in targets if not known(t)]
    if unknown:
        console.print(f"[red]unknown targets: {', '.join(unknown)}[/]")
        return 2
    scenarios: list[Scenario] = override(PROFILES[args.profile](), args)
    if args.only:
        scenarios = [s for s in scenarios if any(fnmatch.fnmatchcase(s.name, o) for o in args.only)]
    skipped = []
    if any(s.needs_redis for s in scenarios) and not Redis.available():
        skipped = [f"{s.name}: redis-server is not installed (apt-get install -y redis-server)"
                   for s in scenarios if s.needs_redis]
        scenarios = [s for s in scenarios if not s.needs_redis]
        console.print("[bold yellow]SKIPPED LOUDLY:[/] the scale-out scenarios need redis-server")
    try:
        ensure_node_modules()
    except (ServerFailed, OSError) as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    fd_limit = raise_fd_limit()
    work = workdir()
    snapshot = None
    # a snapshot never changes, even if HEAD moves on while the bench runs
    refs: dict[str, dict[str, Any]] = {}
    try:
        if args.echo_ref:
            snapshot = snapshot_echo(args.echo_ref, work, ("echo", "echo-pysio"))
        for target in targets:
            ref = ref_of(target)
            if ref:
                refs[target] = report.echo_source(ref, snapshot_echo(ref, work, (target,)))
    except (subprocess.CalledProcessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        console.print(f"[red]cannot snapshot echo/: {exc} {detail.decode(errors='replace')[:200]}[/]")
        return 2
    pinned = report.echo_source(args.echo_ref, snapshot) if snapshot is not None else None

    def source() -> dict[str, Any]:
        return pinned or report.echo_source()

    started = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    t0 = time.monotonic()
    result: dict[str, Any] = {
        "profile": args.profile,
        "started": started.isoformat(),
        "machine": {**report.machine(), "fd_limit": fd_limit},
        "echo_source": source(),
        "echo_refs": refs,
        "targets": targets,
        "scenarios": [{"name": s.name, "title": s.title, "mode": s.mode, "window": s.window,
                       "rate": s.rate, "connections": s.connections, "nodes": s.nodes,
                       "warmup_s": s.warmup, "measure_s": s.measure, "idle_s": s.idle,
                       "compare_to": s.compare_to, "notes": s.notes, "group": s.group,
                       "quiet_nodes": list(s.quiet_nodes), "over_redis": s.over_redis}
                      for s in scenarios],
        "runs": [],
        "all_runs": [],
        "skipped": skipped,
    }
    def runs_on(scenario: Scenario) -> list[str]:
        return [t for t in targets if family(t) in scenario.targets]

    total = sum(s.rounds * len(runs_on(s)) for s in scenarios)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{args.profile} profile", total=total)
        for scenario in scenarios:
            def status(target: str, text: str, scenario: Scenario = scenario) -> None:
                progress.update(task, description=f"{scenario.name} · {label(target)}: {text}")

            rows = []
            echo_sha = source()["echo_sha256"]
            for round_ in range(scenario.rounds):
                order = targets if round_ % 2 == 0 else targets[::-1]
                progress.update(task, description=f"{scenario.name}: starting servers")
                for row in run_scenario(scenario, order, work, status):
                    row["round"] = round_ + 1
                    target = row["target"]
                    row["echo_sha256"] = (echo_sha if is_product(target)
                                          else refs[target]["echo_sha256"] if target in refs else None)
                    row["scenario_finished"] = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
                    progress.console.print(summary(row))
                    rows.append(row)
                progress.advance(task, len(runs_on(scenario)))
            result["all_runs"] += rows
            result["runs"] += best(rows)
        progress.update(task, description=f"{args.profile} profile done")
    result["seconds"] = time.monotonic() - t0
    result["echo_source_after"] = source()
    if not any(is_product(t) for t in targets):
        result["echo_source_after"] = result["echo_source"]  # the working tree was not measured
    elif result["echo_source_after"]["echo_sha256"] != result["echo_source"]["echo_sha256"]:
        console.print("[bold yellow]WARNING: echo/ changed during the run; Echo's rows mix versions[/]")
    result["ratios"] = report.ratios(result["runs"], scenarios, result["all_runs"])
    result["history_costs"] = report.history_costs(result["runs"], scenarios)
    args.out.mkdir(parents=True, exist_ok=True)
    partial = bool(args.only) or not set(TARGETS) <= set(targets) or any(
        v is not None for v in (args.measure, args.warmup, args.rounds))
    stem = args.name or args.profile + ("-partial" if partial else "")
    json_path = args.out / f"{stem}.json"
    md_path = args.out / f"{stem}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = report.markdown(result)
    md_path.write_text(md)
    print(md)
    console.print(f"wrote {json_path} and {md_path} ({result['seconds']:.0f} s)")
    failed = any(not r.get("ok") for r in result["all_runs"])
    if args.keep or failed:
        console.print(f"server and generator logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if any(r.get("server_failed") for r in result["runs"]):
        console.print("[bold red]FAILED: a server did not start[/]")
        return 2
    # the gate is on Echo: a baseline that cannot keep up is a finding, not a failure
    bad = [r for r in result["all_runs"] if not r.get("ok") and is_product(r["target"])]
    if bad:
        console.print(f"[bold red]FAILED: {len(bad)} Echo run(s) lost messages, had publishes "
                      "refused, or failed[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

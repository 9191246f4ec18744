"""Run one scenario against its targets: fresh servers, the Node load generator, /proc samples.

Every server of a scenario starts fresh (so RSS per connection is measured from a clean
process) and all targets' servers run side by side while the targets are measured one after
another, close in time, so a noisy machine disturbs Echo and its baselines alike.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.scenarios import Scenario
from bench.servers import (
    NODE_DIR,
    Redis,
    Server,
    ServerFailed,
    cpu_seconds,
    family,
    make_server,
    ref_of,
    rss_mb,
    safe_name,
    token,
)


@dataclass
class Sample:
    t: float
    cpu: float
    node_cpu: tuple[float, ...]  # each node's process tree
    redis_cpu: float
    rss: float  # the server processes' own RSS (Echo's function workers are not connections)
    rss_tree: float  # with every child process


@dataclass
class Sampler:
    """Server CPU and RSS at the load generator's phase marks, and peak RSS in between."""

    servers: list[Server]
    redis: Redis | None
    marks: dict[str, Sample] = field(default_factory=dict)
    peak_rss: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def pids(self) -> list[int]:
        return [pid for server in self.servers for pid in server.pids()]

    def sample(self) -> Sample:
        trees = [server.pids() for server in self.servers]
        pids = [pid for tree in trees for pid in tree]
        tree_rss = rss_mb(pids)
        self.peak_rss = max(self.peak_rss, tree_rss)
        main = rss_mb([s.process.pid for s in self.servers if s.process is not None and s.alive()])
        node_cpu = tuple(cpu_seconds(tree) for tree in trees)
        return Sample(time.monotonic(), sum(node_cpu), node_cpu,
                      cpu_seconds(self.redis.pids()) if self.redis else 0.0, main, tree_rss)

    def mark(self, name: str) -> None:
        self.marks[name] = self.sample()

    def watch(self) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(0.25):
                self.sample()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def _between(a: Sample, b: Sample) -> tuple[float, float]:
    wall = max(b.t - a.t, 1e-6)
    return 100 * (b.cpu - a.cpu) / wall, 100 * (b.redis_cpu - a.redis_cpu) / wall


def _nodes_between(a: Sample, b: Sample) -> list[float]:
    """Each node's CPU (% of one core) between two samples."""
    wall = max(b.t - a.t, 1e-6)
    return [100 * (after - before) / wall for before, after in zip(a.node_cpu, b.node_cpu, strict=True)]


def run_loadgen(config: dict[str, Any], deadline: float,
                on_phase: Callable[[str, dict[str, Any]], None], log_path: Path) -> dict[str, Any]:
    """Start the generator, call ``on_phase`` at each phase line, return its result line."""
    with log_path.open("ab") as stderr:
        process = subprocess.Popen(
            ["node", str(NODE_DIR / "loadgen.mjs"), json.dumps(config)],
            stdout=subprocess.PIPE, stderr=stderr, cwd=NODE_DIR,
        )
    killer = threading.Timer(deadline + 15, process.kill)
    killer.start()
    result: dict[str, Any] = {"ok": False, "error": "the load generator printed no result"}
    try:
        assert process.stdout is not None
        for raw in process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if line.get("type") == "phase":
                on_phase(line["phase"], line)
            elif line.get("type") == "result":
                result = line
        process.wait(10)
    finally:
        killer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode not in (0, None) and result.get("ok"):
        result = {**result, "ok": False, "error": f"load generator exited with {process.returncode}"}
    return result


def gc_longest_ms(servers: list[Server]) -> tuple[float | None, float | None]:
    """The longest garbage-collector pause any Echo node saw since it started
    (``echo_gc_pause_max_seconds``, wall clock) and the most CPU one collection took
    (``echo_gc_work_max_seconds``), in ms; None where no node answered."""
    import httpx

    from bench.servers import SECRET
    from echo.core.auth import issue_management_token

    headers = {"authorization": "Bearer " + issue_management_token(SECRET)}
    longest: dict[str, float] = {}
    for server in servers:
        try:
            text = httpx.get(server.url + "/metrics", headers=headers, timeout=5).text
        except httpx.HTTPError:
            continue
        for line in text.splitlines():
            for name in ("echo_gc_pause_max_seconds", "echo_gc_work_max_seconds"):
                if line.startswith(name + "{"):
                    value = float(line.rsplit(" ", 1)[1]) * 1000
                    longest[name] = max(longest.get(name, 0.0), value)

    def rounded(name: str) -> float | None:
        return round(longest[name], 1) if name in longest else None

    return rounded("echo_gc_pause_max_seconds"), rounded("echo_gc_work_max_seconds")


def measure(scenario: Scenario, target: str, servers: list[Server], redis: Redis | None,
            workdir: Path, progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """One scenario on one target (one or more nodes); returns its result rows."""
    sampler = Sampler(servers, redis)
    sampler.mark("start")
    watcher = sampler.watch()

    def on_phase(phase: str, line: dict[str, Any]) -> None:
        sampler.mark(phase)
        if phase == "connected":
            progress(f"{line['connections']:,} connected in {line['connectSeconds']:.1f}s")
        elif phase == "measure_start":
            progress("measuring")
        elif phase == "measure_end":
            progress("draining")

    config = scenario.loadgen_config([s.url for s in servers], token())
    try:
        gen = run_loadgen(config, scenario.deadline, on_phase, workdir / f"loadgen-{safe_name(target)}.log")
    finally:
        sampler.stop()
        watcher.join()
    dead = [s.name for s in servers if not s.alive()]
    marks = sampler.marks
    base = {"scenario": scenario.name, "target": target, "nodes": scenario.nodes,
            "connections": gen.get("connections", 0)}
    if target.startswith("echo"):
        base["gc_max_pause_ms"], base["gc_max_work_ms"] = gc_longest_ms(servers)
    row: dict[str, Any] = {**base, "ok": bool(gen.get("ok")), "error": gen.get("error")}
    if dead:
        row.update(ok=False, error=f"server died during the run: {', '.join(dead)}")
    rows = []
    connections = max(gen.get("connections", 0), 1)
    if scenario.idle and "idle_end" in marks:
        cpu, redis_cpu = _between(marks["idle_start"], marks["idle_end"])
        idle = {
            "server_cpu_pct": cpu,
            "redis_cpu_pct": redis_cpu if redis else None,
            "rss_mb": marks["idle_end"].rss_tree,
            "rss_per_conn_kb": 1024 * (marks["idle_end"].rss - marks["start"].rss) / connections,
            "connect_s": gen.get("connectSeconds"),
            "connects_per_s": (connections / gen["connectSeconds"]
                               if gen.get("connectSeconds") else None),
            "server_us_per_connect": (1e6 * (marks["connected"].cpu - marks["start"].cpu)
                                      / connections if "connected" in marks else None),
            "gen_cpu_pct": gen.get("genIdleCpuPct"),
            "gen_rss_mb": gen.get("genRssMb"),
        }
        if scenario.mode == "idle" or scenario.idle_name:
            name = scenario.idle_name or scenario.name
            rows.append({**base, "scenario": name, "ok": row["ok"], "error": row["error"],
                         "kind": "idle", **idle, "lost": 0})
    if scenario.mode != "idle":
        measured = "measure_start" in marks and "measure_end" in marks
        cpu, redis_cpu = _between(marks["measure_start"], marks["measure_end"]) if measured else (0, 0)
        node_cpu = _nodes_between(marks["measure_start"], marks["measure_end"]) if measured else []
        dps = gen.get("deliveriesPerSec", 0) or 0
        pps = gen.get("publishesPerSec") or 0
        latency = gen.get("latencyMs", {})
        at = marks.get("measure_end") or marks.get("idle_end") or marks["start"]
        row.update({
            "kind": scenario.mode,
            "deliveries_per_s": dps,
            "publishes_per_s": gen.get("publishesPerSec"),
            "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
            "p999_ms": latency.get("p999"), "max_ms": latency.get("max"),
            "latency_samples": latency.get("count"),
            "sent": gen.get("sent"), "expected": gen.get("expected"), "received": gen.get("received"),
            "lost": gen.get("lost"), "refused": gen.get("refused"),
            "refused_codes": gen.get("refusedCodes"), "timed_out": gen.get("timedOut"),
            "skipped": gen.get("skipped"), "duplicates": gen.get("duplicates"),
            "out_of_order": gen.get("outOfOrder"),
            "server_cpu_pct": cpu,
            "server_us_per_delivery": (1e4 * cpu / dps) if dps else None,
            "redis_cpu_pct": redis_cpu if redis else None,
            "rss_mb": at.rss_tree, "rss_peak_mb": sampler.peak_rss,
            "rss_per_conn_kb": 1024 * (at.rss - marks["start"].rss) / connections,
            "connect_s": gen.get("connectSeconds"),
            "gen_cpu_pct": gen.get("genCpuPct"),
            "gen_loop_p99_ms": gen.get("loopDelayP99Ms"),
            "gen_rss_mb": gen.get("genRssMb"),
        })
        if scenario.nodes > 1:
            row["node_cpu_pct"] = node_cpu
        if scenario.quiet_nodes and node_cpu:
            quiet = sum(node_cpu[i] for i in scenario.quiet_nodes)
            row.update(quiet_nodes=list(scenario.quiet_nodes), quiet_cpu_pct=quiet,
                       quiet_us_per_publish=(1e4 * quiet / pps) if pps else None)
        if row["ok"] and (gen.get("lost") or 0) > 0:
            row.update(ok=False, error=f"{gen['lost']} deliveries lost (not received when "
                                      "deliveries stopped, or after the drain's "
                                      f"{scenario.drain:g}s)")
        elif row["ok"] and (gen.get("refused") or 0) > 0:
            row.update(ok=False, error=f"{gen['refused']} publishes refused: {gen.get('refusedCodes')}")
        rows.append(row)
    elif not rows:
        rows.append(row)
    return rows


def run_scenario(scenario: Scenario, targets: list[str], workdir: Path,
                 progress: Callable[[str, str], None]) -> list[dict[str, Any]]:
    """Fresh servers for every target of the scenario, then each target measured in turn."""
    wanted = [t for t in targets if family(t) in scenario.targets
              and not (scenario.history_of and ref_of(t))]  # an Echo before history: no rule
    # one Redis per target: a target's nodes never hear another target's traffic (an idle
    # server of another target would otherwise decode it all, and load the machine)
    redis: dict[str, Redis] = {}
    servers: dict[str, list[Server]] = {}
    rows: list[dict[str, Any]] = []
    try:
        for t in wanted:
            if scenario.needs_redis:
                redis[t] = Redis(workdir).start()
            url = redis[t].url if t in redis else None
            servers[t] = [make_server(t, workdir, url, i) for i in range(scenario.nodes)]
        for group in servers.values():
            for server in group:
                server.start()
        failed: dict[str, str] = {}
        # every server starts at once (up to 4 targets x 4 nodes): 2 cores need longer for many
        ready_within = 30 + 2 * sum(len(group) for group in servers.values())
        for target, group in servers.items():
            for server in group:
                try:
                    server.wait_ready(ready_within)
                except ServerFailed as exc:
                    failed[target] = str(exc)
        for target, group in servers.items():
            if target in failed:
                rows.append({"scenario": scenario.name, "target": target, "nodes": scenario.nodes,
                             "ok": False, "server_failed": True,
                             "error": f"server failed to start: {failed[target]}"})
                continue
            progress(target, "connecting")

            def report(text: str, target: str = target) -> None:
                progress(target, text)

            rows += measure(scenario, target, group, redis.get(target), workdir, report)
            time.sleep(0.2)  # let the closed connections settle before the next target
    finally:
        every = [server for group in servers.values() for server in group]
        for server in every:
            server.interrupt()
        for server in every:
            server.stop()
        for one in redis.values():
            one.stop()
    return rows


def best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scenario, target) out of several rounds: the best round that ran cleanly.

    Best = most deliveries/s when publishing as fast as accepted, lowest p99 at a fixed rate,
    the first round for an idle row (its RSS is the one measured on a fresh server).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["target"]), []).append(row)
    chosen = []
    for group in groups.values():
        clean = [r for r in group if r.get("ok")] or group
        kind = clean[0].get("kind")
        if kind == "window":
            pick = max(clean, key=lambda r: r.get("deliveries_per_s") or 0)
        elif kind == "rate":
            pick = min(clean, key=lambda r: float(r["p99_ms"]) if r.get("p99_ms") is not None else 1e12)
        else:
            pick = clean[0]
        # a round that failed must not hide behind a good one
        chosen.append({**pick, "rounds": len(group),
                       "ok": all(r.get("ok") for r in group),
                       "error": "; ".join(str(r.get("error")) for r in group if not r.get("ok")) or None})
    return chosen

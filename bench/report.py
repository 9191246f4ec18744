"""Machine description, Echo / baseline ratios, and the JSON and Markdown outputs."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.scenarios import Scenario
from bench.servers import NODE_DIR, is_product, label, ref_of, short_label

GEN_BOUND_PCT = 85.0  # a generator this busy may be what limits the figure


def _version(package: str) -> str | None:
    try:
        version: str = metadata.version(package)
        return version
    except metadata.PackageNotFoundError:
        return None


def _node_package(name: str) -> str | None:
    try:
        data = json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())
        return str(data["version"])
    except (OSError, ValueError, KeyError):
        return None


def echo_source(ref: str | None = None, snapshot: Path | None = None) -> dict[str, Any]:
    """Which Echo was measured: the commit, uncommitted changes, and a hash of echo/'s files.

    For the working tree it is taken before every scenario and at the end: if the hash
    moves, Echo changed under the bench (someone edited the tree) and the rows say which
    version each one measured. With ``--echo-ref``, the snapshot never moves.
    """
    repo = Path(__file__).resolve().parent.parent
    root = snapshot if snapshot is not None else repo
    digest = hashlib.sha256()
    for path in sorted((root / "echo").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                  timeout=10)
        except OSError:
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    if snapshot is not None:
        return {"commit": git("rev-parse", "--short", f"{ref}^{{commit}}"), "ref": ref,
                "dirty": False, "echo_sha256": digest.hexdigest()[:16]}
    status = git("status", "--porcelain", "--", "echo")
    return {"commit": git("rev-parse", "--short", "HEAD"), "ref": None, "dirty": bool(status),
            "echo_sha256": digest.hexdigest()[:16]}


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except OSError:
        node = None
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": round(mem_gb, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": node,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "packages": {
            "python-socketio": _version("python-socketio"),
            "python-engineio": _version("python-engineio"),
            "uvicorn": _version("uvicorn"),
            "uvloop": _version("uvloop"),
            "websockets": _version("websockets"),
            "echo-realtime": _version("echo-realtime"),
            "socket.io (node)": _node_package("socket.io"),
            "socket.io-client (node)": _node_package("socket.io-client"),
        },
        "argv": sys.argv[1:],
    }


RATIO_KEYS = ("deliveries_per_s", "server_us_per_delivery", "p50_ms", "p99_ms", "p999_ms",
              "rss_per_conn_kb")


NOISE_FLOOR = 0.10  # µs/delivery moves this much between identical builds in short windows


def spread(all_runs: list[dict[str, Any]], scenario: str, targets: tuple[str, ...]) -> float | None:
    """Round-to-round spread of µs/delivery (max ÷ min - 1) of these targets: the run's own noise."""
    worst = None
    for target in targets:
        values = [r["server_us_per_delivery"] for r in all_runs
                  if r["scenario"] == scenario and r["target"] == target and r.get("ok")
                  and r.get("server_us_per_delivery")]
        if len(values) > 1:
            worst = max(worst or 0.0, max(values) / min(values) - 1)
    return worst


def ratios(rows: list[dict[str, Any]], scenarios: list[Scenario],
           all_runs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Each Echo being built (either transport) against Echo before and the baselines.

    ``before``: the ``echo@REF`` target, same scenario (it runs the functions too), with the
    rounds' own spread and a ``regressed`` flag when µs/delivery grew beyond it (and beyond
    ``NOISE_FLOOR``); ``node``/``pysio``: the baselines, middleware scenarios against the
    plain shape's rows.
    """
    by = {(r["scenario"], r["target"]): r for r in rows if r.get("ok") or r.get("deliveries_per_s")}
    compare = {s.name: s.compare_to for s in scenarios if s.compare_to}
    befores = list(dict.fromkeys(r["target"] for r in rows if ref_of(r["target"])))
    out = []
    for row in rows:
        if not is_product(row["target"]) or row.get("server_failed"):
            continue
        name = row["scenario"]
        against = compare.get(name, name)
        entry: dict[str, Any] = {"scenario": name, "target": row["target"], "against": against}
        sides = [("node", (against, "node")), ("pysio", (against, "pysio"))]
        if befores:
            sides.insert(0, ("before", (name, befores[0])))
            entry["before_target"] = befores[0]
        for side, key in sides:
            other = by.get(key)
            if not other:
                continue
            entry[side] = {k: _ratio(row.get(k), other.get(k)) for k in RATIO_KEYS}
            # a saturated generator caps both figures: the deliveries/s ratio then says little
            entry[side]["generator_bound"] = any(
                (r.get("gen_cpu_pct") or 0) > GEN_BOUND_PCT for r in (row, other))
            if side == "before":
                noise = spread(all_runs or [], name, (row["target"], other["target"]))
                cpu = entry[side]["server_us_per_delivery"]
                entry[side]["round_spread"] = noise
                entry[side]["regressed"] = cpu is not None and cpu > 1 + max(noise or 0.0, NOISE_FLOOR)
        if any(side in entry for side in ("before", "node", "pysio")):
            out.append(entry)
    return out


def _ratio(a: Any, b: Any) -> float | None:
    if not isinstance(a, int | float) or not isinstance(b, int | float) or not b or a is None:
        return None
    return a / b


def _fmt(value: Any, digits: int = 1, thousands: bool = False) -> str:
    if value is None:
        return "-"
    if thousands:
        return f"{value / 1000:,.1f}k" if value >= 1000 else f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _intro(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    pk = m["packages"]
    source = result.get("echo_source", {})
    refs = result.get("echo_refs", {})
    before = "".join(
        f" Echo before = `{target}`: {ref.get('commit')}, echo/ sha256 {ref.get('echo_sha256')}."
        for target, ref in refs.items())
    return [
        f"# Echo bench: `{result['profile']}` profile",
        "",
        f"Echo {source.get('commit')}"
        + (f" (snapshot of `{source['ref']}`)" if source.get("ref") else "")
        + (" + uncommitted changes" if source.get("dirty") else "")
        + f", echo/ sha256 {source.get('echo_sha256')}." + before,
        "",
        f"Run {result['started']} in {result['seconds']:.0f} s. Machine: {m['cores']} cores "
        f"({m['cpu_model']}), {m['memory_gb']} GiB, Linux {m['kernel']}; Python {m['python']}, "
        f"Node {m['node']}; python-socketio {pk['python-socketio']}, uvicorn {pk['uvicorn']}, "
        f"socket.io {pk['socket.io (node)']}, load generator socket.io-client "
        f"{pk['socket.io-client (node)']}; load average at start {m['load_avg_at_start']}.",
        "",
        "Echo = `echoctl serve` on its native transport; Echo on py-sio = the same on its "
        "python-socketio transport (`ECHO_TRANSPORT=python-socketio`); Echo before = Echo as "
        "committed at the ref above; Node = minimal socket.io 4 server (bench/node/baseline-server.mjs); "
        "py-sio = hand-written python-socketio under `uvicorn.run` defaults (bench/baseline_pysio.py). "
        "Deliveries/s count messages received by subscribers in the measured window; latency is "
        "publish → receive on one clock; server CPU is % of one core (all nodes and Echo's function "
        "workers); µs/deliv = server CPU time per delivery; kB/conn = RSS growth per connection; "
        f"gen = the load generator's own CPU (★ when above {GEN_BOUND_PCT:.0f}%: the generator may "
        "be what limits that figure).",
        "",
    ]


def _runs_table(result: dict[str, Any]) -> list[str]:
    source = result.get("echo_source", {})
    lines = [
        "| scenario | server | deliveries/s | p50 ms | p99 ms | p99.9 ms | lost | refused "
        "| server CPU % | µs/deliv | RSS MB | kB/conn | gen CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["runs"]:
        name = row["scenario"] + ("" if row.get("ok") else " ⚠")
        if (is_product(row["target"]) and row.get("echo_sha256")
                and row["echo_sha256"] != source.get("echo_sha256")):
            name += " †"
        nodes = row.get("nodes", 1)
        server = short_label(row["target"]) + (f" x{nodes}" if nodes > 1 else "")
        if row.get("server_failed") or ("server_cpu_pct" not in row):
            error = " ".join(str(row.get("error")).split())  # one table cell: no line breaks
            lines.append(f"| {name} | {server} | failed: {error[:80]} |" + " |" * 10)
            continue
        gen = row.get("gen_cpu_pct")
        gen_text = _fmt(gen, 0) + (" ★" if gen and gen > GEN_BOUND_PCT else "")
        if row.get("kind") == "idle":
            lines.append(
                f"| {name} | {server} | idle, {row['connections']:,} conns "
                f"(connected in {_fmt(row.get('connect_s'))} s: "
                f"{_fmt(row.get('connects_per_s'), 0, thousands=True)}/s, "
                f"{_fmt(row.get('server_us_per_connect'), 0)} µs server CPU each; "
                f"GC pause max {_fmt(row.get('gc_max_pause_ms'))} ms, "
                f"work {_fmt(row.get('gc_max_work_ms'))} ms) | | | | | | "
                f"{_fmt(row['server_cpu_pct'])} | | {_fmt(row['rss_mb'], 0)} | "
                f"{_fmt(row['rss_per_conn_kb'])} | {gen_text} |"
            )
            continue
        lines.append(
            f"| {name} | {server} | {_fmt(row['deliveries_per_s'], thousands=True)} | "
            f"{_fmt(row['p50_ms'], 2)} | {_fmt(row['p99_ms'], 2)} | {_fmt(row['p999_ms'], 2)} | "
            f"{row.get('lost', '-')} | {row.get('refused', '-')} | {_fmt(row['server_cpu_pct'], 0)} | "
            f"{_fmt(row['server_us_per_delivery'], 2)} | {_fmt(row['rss_mb'], 0)} | "
            f"{_fmt(row['rss_per_conn_kb'])} | {gen_text} |"
        )
    return lines


def _one(side: dict[str, Any], key: str) -> str:
    bound = key == "deliveries_per_s" and side.get("generator_bound")
    return _fmt(side.get(key), 2) + (" ★" if bound else "")


def _before_after_table(result: dict[str, Any]) -> list[str]:
    entries = [e for e in result["ratios"] if "before" in e]
    if not entries:
        return []
    lines = [
        "",
        "## Before → after",
        "",
        f"Echo being built (native transport, and its python-socketio transport) ÷ "
        f"{label(entries[0]['before_target'])}, same scenario, same run. deliveries/s: above 1 "
        "is after ahead; µs/delivery (server CPU per delivery, the figure least disturbed by the "
        "machine's other load) and latency: below 1 is after ahead. ★: the load generator was "
        "saturated in one of the two runs (deliveries/s capped by the machine). Spread: how much "
        "µs/delivery moved between the rounds of the same build (the run's own noise, with 2+ "
        f"rounds); ▲: µs/delivery grew by more than that spread and more than {NOISE_FLOOR:.0%}.",
        "",
        "| scenario | Echo | deliveries/s ÷before | µs/deliv ÷before | spread | p50 ÷before | p99 ÷before "
        "| kB/conn ÷before |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        side = entry["before"]
        noise = side.get("round_spread")
        lines.append(
            f"| {entry['scenario']} | {short_label(entry['target'])} | {_one(side, 'deliveries_per_s')} | "
            f"{_one(side, 'server_us_per_delivery')}{' ▲' if side.get('regressed') else ''} | "
            f"{'-' if noise is None else f'±{noise:.0%}'} | {_one(side, 'p50_ms')} | "
            f"{_one(side, 'p99_ms')} | {_one(side, 'rss_per_conn_kb')} |")
    return lines


def _baselines_table(result: dict[str, Any]) -> list[str]:
    entries = [e for e in result["ratios"] if "node" in e or "pysio" in e]
    if not entries:
        return []
    lines = [
        "",
        "## Echo / baseline",
        "",
        "Ratios of Echo's figure to the baseline's in the same run (deliveries/s: above 1 is Echo "
        "ahead; µs/delivery and latency: below 1 is Echo ahead). Middleware scenarios are held to "
        "the baselines' plain routing of the same shape (they have no functions). ★: the load "
        "generator was saturated in one of the two runs, so deliveries/s is capped by the machine "
        "(2 cores: one for the server, one for the generator) and µs/delivery is the figure to "
        "compare.",
        "",
        "| scenario | Echo | vs | deliveries/s ÷Node | ÷py-sio | µs/deliv ÷Node | ÷py-sio | "
        "p99 ÷Node | ÷py-sio | kB/conn ÷Node | ÷py-sio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in entries:
        node, py = entry.get("node", {}), entry.get("pysio", {})

        def pair(key: str, node: dict[str, Any] = node, py: dict[str, Any] = py) -> str:
            return f"{_one(node, key)} | {_one(py, key)}"

        lines.append(
            f"| {entry['scenario']} | {short_label(entry.get('target', 'echo'))} | {entry['against']} | "
            f"{pair('deliveries_per_s')} | {pair('server_us_per_delivery')} | {pair('p99_ms')} | "
            f"{pair('rss_per_conn_kb')} |"
        )
    return lines


def _scale_table(result: dict[str, Any]) -> list[str]:
    """The scale-out series per target: throughput, CPU per delivery, the quiet node's CPU."""
    series = [s["name"] for s in result["scenarios"] if s.get("group") == "scale-out"]
    rows = [r for r in result["runs"] if r["scenario"] in series and "server_cpu_pct" in r]
    if not rows:
        return []
    lines = [
        "",
        "## Scale-out: 1,000 channels, each channel's subscribers on one node",
        "",
        "Every node on one Redis; with 2+ nodes every publish crosses nodes. µs/deliv = all nodes' "
        "CPU ÷ deliveries (÷1 node: the same figure divided by the target's 1-node one, so 1.0 = "
        "adding nodes costs nothing per delivery). Quiet node: one more node, on the same Redis, "
        "holding 10 subscribers of a channel nobody publishes to; its CPU during the window is what "
        "a node spends on channels it does not serve (µs per publish = its CPU time ÷ the messages "
        "published elsewhere).",
        "",
        "| target | scenario | nodes | deliveries/s | publishes/s | µs/deliv | ÷1 node | CPU % per node "
        "| Redis CPU % | quiet node CPU % | quiet µs/publish | lost | gen CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    for target in targets:
        mine = sorted((r for r in rows if r["target"] == target),
                      key=lambda r: (series.index(r["scenario"])))
        one = next((r for r in mine if r.get("nodes") == 1), None)
        unit = one.get("server_us_per_delivery") if one else None
        for row in mine:
            name = row["scenario"] + ("" if row.get("ok") else " ⚠")
            per_node = row.get("node_cpu_pct") or [row["server_cpu_pct"]]
            gen = row.get("gen_cpu_pct")
            lines.append(
                f"| {short_label(target)} | {name} | {row.get('nodes', 1)} | "
                f"{_fmt(row.get('deliveries_per_s'), thousands=True)} | "
                f"{_fmt(row.get('publishes_per_s'), thousands=True)} | "
                f"{_fmt(row.get('server_us_per_delivery'), 2)} | "
                f"{_fmt(_ratio(row.get('server_us_per_delivery'), unit), 2)} | "
                f"{' / '.join(_fmt(c, 0) for c in per_node)} | {_fmt(row.get('redis_cpu_pct'), 0)} | "
                f"{_fmt(row.get('quiet_cpu_pct'), 1)} | {_fmt(row.get('quiet_us_per_publish'), 2)} | "
                f"{row.get('lost', '-')} | {_fmt(gen, 0) + (' ★' if gen and gen > GEN_BOUND_PCT else '')} |")
    return lines


def history_costs(rows: list[dict[str, Any]], scenarios: list[Scenario]) -> list[dict[str, Any]]:
    """Each history scenario ÷ the same shape with history off, same target, same run."""
    by = {(r["scenario"], r["target"]): r for r in rows if r.get("deliveries_per_s")}
    out = []
    for scenario in scenarios:
        if not scenario.history_of:
            continue
        for (name, target), row in by.items():
            plain = by.get((scenario.history_of, target))
            if name != scenario.name or plain is None:
                continue
            out.append({"scenario": name, "target": target, "plain": scenario.history_of,
                        "us_per_delivery": row.get("server_us_per_delivery"),
                        "plain_us_per_delivery": plain.get("server_us_per_delivery"),
                        **{k: _ratio(row.get(k), plain.get(k)) for k in RATIO_KEYS}})
    return out


def _history_table(result: dict[str, Any]) -> list[str]:
    entries = result.get("history_costs") or []
    if not entries:
        return []
    lines = [
        "",
        "## History on ÷ off",
        "",
        "The same shape on channels that keep history (`h:*`: 100 messages, 600 s; the memory "
        "broker on one node, Redis Streams on two) ÷ the plain run, same target, same run. "
        "Goal: µs/delivery at most 1.2 times.",
        "",
        "| scenario | server | µs/deliv on | off | µs/deliv ÷off | deliveries/s ÷off | p99 ÷off |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['scenario']} | {short_label(e['target'])} | {_fmt(e['us_per_delivery'], 2)} | "
            f"{_fmt(e['plain_us_per_delivery'], 2)} | {_fmt(e.get('server_us_per_delivery'), 2)} | "
            f"{_fmt(e.get('deliveries_per_s'), 2)} | {_fmt(e.get('p99_ms'), 2)} |")
    return lines


GC_GOAL_MS = 20


def _gc_table(result: dict[str, Any]) -> list[str]:
    """The longest garbage-collector pause of every Echo row (issue 19: none over 20 ms)."""
    rows = [r for r in result["runs"] if is_product(r["target"]) and r.get("gc_max_pause_ms") is not None]
    if not rows:
        return []
    lines = [
        "",
        "## Garbage-collector pauses",
        "",
        "Longest pause of any Echo node since it started (connection ramp included), from "
        "`gc.callbacks`: wall clock (what the event loop lost) and the collector's own CPU "
        "time (the rest is the OS running something else meanwhile, on a saturated machine). "
        f"Goal: none over {GC_GOAL_MS} ms.",
        "",
        "| scenario | server | connections | pause max ms | work max ms |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        over = " ⚠" if (r.get("gc_max_pause_ms") or 0) > GC_GOAL_MS else ""
        lines.append(f"| {r['scenario']} | {short_label(r['target'])} | {r.get('connections', 0):,} | "
                     f"{_fmt(r.get('gc_max_pause_ms'))}{over} | {_fmt(r.get('gc_max_work_ms'))} |")
    return lines


def markdown(result: dict[str, Any]) -> str:
    source, after = result.get("echo_source", {}), result.get("echo_source_after", {})
    lines = _intro(result) + _runs_table(result)
    lines += _before_after_table(result) + _baselines_table(result) + _history_table(result)
    lines += _scale_table(result) + _gc_table(result)
    if after and after.get("echo_sha256") != source.get("echo_sha256"):
        lines[2:2] = ["**Warning: echo/ changed while this run was going on "
                      f"({source.get('echo_sha256')} → {after.get('echo_sha256')}): Echo rows "
                      "marked † measured another version than the first; run it again, or "
                      "use `--echo-ref`.**", ""]
    failures = [r for r in result["runs"] if not r.get("ok")]
    if failures:
        lines += ["", "## Problems", ""]
        lines += [f"- {r['scenario']} on {label(r['target'])}: {str(r.get('error'))[-1500:]}"
                  for r in failures]
    if result.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"

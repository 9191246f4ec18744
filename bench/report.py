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
from bench.servers import LABELS, NODE_DIR

GEN_BOUND_PCT = 85.0  # a generator this busy may be what limits the figure


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _node_package(name: str) -> str | None:
    try:
        return json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())["version"]
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


def ratios(rows: list[dict[str, Any]], scenarios: list[Scenario]) -> list[dict[str, Any]]:
    """Echo / baseline for each scenario (middleware ones against the plain shape's baselines)."""
    by = {(r["scenario"], r["target"]): r for r in rows if r.get("ok") or r.get("deliveries_per_s")}
    compare = {s.name: s.compare_to for s in scenarios if s.compare_to}
    out = []
    for row in rows:
        if row["target"] != "echo" or row.get("server_failed"):
            continue
        name = row["scenario"]
        against = compare.get(name, name)
        entry: dict[str, Any] = {"scenario": name, "against": against}
        for base in ("node", "pysio"):
            other = by.get((against, base))
            if not other:
                continue
            entry[base] = {
                key: _ratio(row.get(key), other.get(key))
                for key in ("deliveries_per_s", "server_us_per_delivery", "p50_ms", "p99_ms",
                            "p999_ms", "rss_per_conn_kb")
            }
            # a saturated generator caps both figures: the deliveries/s ratio then says little
            entry[base]["generator_bound"] = any(
                (r.get("gen_cpu_pct") or 0) > GEN_BOUND_PCT for r in (row, other))
        if len(entry) > 2:
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


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    pk = m["packages"]
    source, after = result.get("echo_source", {}), result.get("echo_source_after", {})
    lines = [
        f"# Echo bench: `{result['profile']}` profile",
        "",
        f"Echo {source.get('commit')}"
        + (f" (snapshot of `{source['ref']}`)" if source.get("ref") else "")
        + (" + uncommitted changes" if source.get("dirty") else "")
        + f", echo/ sha256 {source.get('echo_sha256')}.",
        "",
        f"Run {result['started']} in {result['seconds']:.0f} s. Machine: {m['cores']} cores "
        f"({m['cpu_model']}), {m['memory_gb']} GiB, Linux {m['kernel']}; Python {m['python']}, "
        f"Node {m['node']}; python-socketio {pk['python-socketio']}, uvicorn {pk['uvicorn']}, "
        f"socket.io {pk['socket.io (node)']}, load generator socket.io-client "
        f"{pk['socket.io-client (node)']}; load average at start {m['load_avg_at_start']}.",
        "",
        "Echo = `echoctl serve`; Node = minimal socket.io 4 server (bench/node/baseline-server.mjs); "
        "py-sio = hand-written python-socketio under `uvicorn.run` defaults (bench/baseline_pysio.py). "
        "Deliveries/s count messages received by subscribers in the measured window; latency is "
        "publish → receive on one clock; server CPU is % of one core (all nodes and Echo's function "
        "workers); µs/deliv = server CPU time per delivery; kB/conn = RSS growth per connection; "
        f"gen = the load generator's own CPU (★ when above {GEN_BOUND_PCT:.0f}%: the generator may "
        "be what limits that figure).",
        "",
        "| scenario | server | deliveries/s | p50 ms | p99 ms | p99.9 ms | lost | refused "
        "| server CPU % | µs/deliv | RSS MB | kB/conn | gen CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    short = {"echo": "Echo", "node": "Node", "pysio": "py-sio"}
    for row in result["runs"]:
        name = row["scenario"] + ("" if row.get("ok") else " ⚠")
        if row.get("echo_sha256") and row["echo_sha256"] != source.get("echo_sha256"):
            name += " †"
        nodes = row.get("nodes", 1)
        server = short.get(row["target"], row["target"]) + (f" x{nodes}" if nodes > 1 else "")
        if row.get("server_failed") or ("server_cpu_pct" not in row):
            lines.append(f"| {name} | {server} | failed: {str(row.get('error'))[:80]} |" + " |" * 10)
            continue
        gen = row.get("gen_cpu_pct")
        gen_text = _fmt(gen, 0) + (" ★" if gen and gen > GEN_BOUND_PCT else "")
        if row.get("kind") == "idle":
            lines.append(
                f"| {name} | {server} | idle, {row['connections']:,} conns "
                f"(connected in {_fmt(row.get('connect_s'))} s) | | | | | | "
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
    lines += [
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
        "| scenario | vs | deliveries/s ÷Node | ÷py-sio | µs/deliv ÷Node | ÷py-sio | "
        "p99 ÷Node | ÷py-sio | kB/conn ÷Node | ÷py-sio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["ratios"]:
        node, py = entry.get("node", {}), entry.get("pysio", {})

        def pair(key: str, node: dict = node, py: dict = py) -> str:
            def one(side: dict) -> str:
                bound = key == "deliveries_per_s" and side.get("generator_bound")
                return _fmt(side.get(key), 2) + (" ★" if bound else "")
            return f"{one(node)} | {one(py)}"

        lines.append(
            f"| {entry['scenario']} | {entry['against']} | {pair('deliveries_per_s')} | "
            f"{pair('server_us_per_delivery')} | {pair('p99_ms')} | {pair('rss_per_conn_kb')} |"
        )
    if after and after.get("echo_sha256") != source.get("echo_sha256"):
        lines[2:2] = ["**Warning: echo/ changed while this run was going on "
                      f"({source.get('echo_sha256')} → {after.get('echo_sha256')}): Echo rows "
                      "marked † measured another version than the first; run it again, or "
                      "use `--echo-ref`.**", ""]
    failures = [r for r in result["runs"] if not r.get("ok")]
    if failures:
        lines += ["", "## Problems", ""]
        lines += [f"- {r['scenario']} on {LABELS.get(r['target'], r['target'])}: {r.get('error')}"
                  for r in failures]
    if result.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"

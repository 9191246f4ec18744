"""Publish the task's open connections to CloudWatch, for connection-based autoscaling.

CPU says little about a real-time server (idle sockets cost memory, not CPU), and memory
never falls in a Python process, so a memory target would never scale in. The number of
open connections is what a task carries, so the service scales on ``Echo/Connections``.

Started by :mod:`echo.targets.aws.bootstrap` as a separate process just before it execs
``echoctl serve`` (so the server keeps the container's PID and receives ECS's SIGTERM
itself). Every ``interval`` seconds it reads the server's ``/metrics`` on 127.0.0.1 with a
management token minted from ``ECHO_SECRET``, sums the ``echo_connections`` gauge over its
apps and prints one CloudWatch Embedded Metric Format line to stdout. The awslogs driver
sends stdout to CloudWatch Logs with PutLogEvents, and CloudWatch Logs turns EMF lines into
metrics by itself: no agent, no SDK call and no ``cloudwatch:PutMetricData`` permission.

Run as ``python -m echo.targets.aws.metrics_emitter [--interval S] [--url URL]``; it exits
when the process that started it (the server) is gone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TextIO

NAMESPACE = "Echo"
METRIC = "Connections"
DIMENSION = "ServiceName"
SERVICE_ENV = "CLOUDWATCH_SERVICE_NAME"  # not ECHO_*: not a server setting
GAUGE = "echo_connections"  # echo/core/metrics.py: open connections, labelled by app
INTERVAL = 60.0  # CloudWatch's standard resolution; the scaling alarms look at minutes


def connections(exposition: str) -> float:
    """The node's open connections: the ``echo_connections`` gauge summed over its apps."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(exposition)
               if family.name == GAUGE for sample in family.samples if sample.name == GAUGE)


def emf_line(value: float, service: str, timestamp_ms: int) -> str:
    """One EMF record: the ``_aws`` block declares which top-level key is the metric."""
    record = {
        "_aws": {"Timestamp": timestamp_ms, "CloudWatchMetrics": [{
            "Namespace": NAMESPACE, "Dimensions": [[DIMENSION]],
            "Metrics": [{"Name": METRIC, "Unit": "Count"}]}]},
        DIMENSION: service,
        METRIC: value,
    }
    return json.dumps(record, separators=(",", ":"))


def scrape(url: str, secret: str, timeout: float = 5.0) -> float:
    """Read ``/metrics`` with a short-lived management token (it may not be public)."""
    from echo.core.auth import issue_management_token

    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {issue_management_token(secret, ttl=60)}"})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return connections(reply.read().decode("utf-8"))


def run(url: str, secret: str, service: str, interval: float, out: TextIO,
        alive: Callable[[], bool]) -> None:
    """Emit a line per interval while ``alive()``; a failed scrape skips one (no fake zero)."""
    warned = False
    while alive():
        time.sleep(interval)
        try:
            value = scrape(url, secret)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            if not warned:  # once: the server may still be starting
                print(f"metrics emitter: {url} not read ({exc}); retrying", file=sys.stderr)
                warned = True
            continue
        warned = False
        out.write(emf_line(value, service, int(time.time() * 1000)) + "\n")
        out.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--interval", type=float, default=INTERVAL)
    parser.add_argument("--url", default=None, help="default: the local server's /metrics")
    args = parser.parse_args(argv)
    secret = os.environ.get("ECHO_SECRET")
    if not secret:
        sys.exit("metrics emitter: ECHO_SECRET is not set; nothing to sign /metrics requests")
    url = args.url or f"http://127.0.0.1:{os.environ.get('ECHO_PORT', '3000')}/metrics"
    service = os.environ.get(SERVICE_ENV, "echo")
    parent = os.getppid()
    try:
        run(url, secret, service, args.interval, sys.stdout, lambda: os.getppid() == parent)
    except KeyboardInterrupt:  # Ctrl-C of a local run reaches the whole process group
        pass


if __name__ == "__main__":
    main()

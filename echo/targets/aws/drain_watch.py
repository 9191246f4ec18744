"""Start Echo's drain when the load balancer starts draining this task, not at SIGTERM.

ECS stops a task behind an ALB in this order: deregister the target (the ALB sends it no new
connections but keeps the open ones), wait the deregistration delay, close what is still
open, and only then send SIGTERM. Echo's shutdown notice (``server_shutdown``, then a
transport close so clients reconnect elsewhere) would reach no one. So this process, started
beside the server by the bootstrap, asks the target group every few seconds how its own
target is; once it is ``draining`` (or gone, after it was seen registered) it sends the
server SIGTERM itself, while the ALB still carries the sockets: clients hear the notice and
reconnect to the other tasks.

Environment: ``ECHO_TARGET_GROUP_ARN`` (set by the template), the task's IP from the ECS
task metadata endpoint (``ECHO_TARGET_IP`` overrides it), ``ECHO_PORT``; the server is the
parent process (``ECHO_DRAIN_PID`` overrides it). Run as ``python -m
echo.targets.aws.drain_watch``; it ends with the server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import urllib.request
from typing import Any

log = logging.getLogger("echo.drain_watch")

TARGET_GROUP_ENV = "ECHO_TARGET_GROUP_ARN"
POLL_SECONDS = 5.0
GONE = ("unused", None)
"""States of a target that is no longer in the group (moto reports ``unused``)."""


def own_ip(environ: dict[str, str]) -> str | None:
    """This task's address in its VPC: what the target group registered."""
    if environ.get("ECHO_TARGET_IP"):
        return environ["ECHO_TARGET_IP"]
    metadata = environ.get("ECS_CONTAINER_METADATA_URI_V4")
    if not metadata:
        return None
    with urllib.request.urlopen(metadata + "/task", timeout=5) as reply:
        task = json.load(reply)
    for container in task.get("Containers", []):
        for network in container.get("Networks", []):
            for address in network.get("IPv4Addresses", []):
                return str(address)
    return None


def target_state(client: Any, target_group: str, ip: str, port: int) -> str | None:
    """The target's state in the group (``healthy``, ``draining``, ...), None if unknown."""
    try:
        found = client.describe_target_health(
            TargetGroupArn=target_group, Targets=[{"Id": ip, "Port": port}])
    except Exception as exc:  # InvalidTarget once it is gone; anything else: ask again later
        if "InvalidTarget" in str(exc):
            return None
        raise
    for description in found.get("TargetHealthDescriptions", []):
        return str(description.get("TargetHealth", {}).get("State"))
    return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def watch(client: Any, target_group: str, ip: str, port: int, server_pid: int,
          poll: float = POLL_SECONDS) -> str:
    """Poll until the target drains (then SIGTERM the server) or the server is gone; return
    what ended the watch."""
    registered = False
    while alive(server_pid):
        try:
            state = target_state(client, target_group, ip, port)
        except Exception as exc:
            log.warning("target health unknown (%s); asking again in %gs", str(exc)[:200], poll)
            state = "unknown"
        if state not in GONE and state != "unknown":
            registered = True
        if state == "draining" or (registered and state in GONE):
            log.info("the load balancer is draining %s:%d (%s): starting Echo's drain now", ip,
                     port, state)
            os.kill(server_pid, signal.SIGTERM)
            return "drained"
        time.sleep(poll)
    return "server gone"


def main() -> None:
    import boto3

    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    environ = dict(os.environ)
    target_group = environ.get(TARGET_GROUP_ENV)
    server_pid = int(environ.get("ECHO_DRAIN_PID") or os.getppid())
    try:
        ip = own_ip(environ)
    except OSError as exc:
        log.warning("no task address from the ECS metadata endpoint (%s): not watching", exc)
        return
    if not target_group or not ip:
        log.info("no target group or task address: not watching for a drain")
        return
    from botocore.config import Config

    # short timeouts: a hung call must not outlast the deregistration delay
    client = boto3.client("elbv2", region_name=environ.get("ECHO_AWS_REGION"), config=Config(
        connect_timeout=3, read_timeout=5, retries={"max_attempts": 2, "mode": "standard"}))
    poll = float(environ.get("ECHO_DRAIN_POLL", POLL_SECONDS))
    watch(client, target_group, ip, int(environ.get("ECHO_PORT", "3000")), server_pid, poll)


if __name__ == "__main__":
    main()

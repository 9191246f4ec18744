"""On AWS, Echo's drain starts when the ALB starts draining the task (issue 17), not at the
SIGTERM that ECS sends only after the ALB has closed every socket: against moto's ELBv2."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EchoProcess, MotoServer, connect, make_project

pytestmark = [pytest.mark.aws, pytest.mark.anyio]

TASK_IP = "10.40.0.17"


def target_group(moto: MotoServer) -> str:
    ec2, elbv2 = moto.client("ec2"), moto.client("elbv2")
    vpc = ec2.create_vpc(CidrBlock="10.40.0.0/16")["Vpc"]["VpcId"]
    arn = elbv2.create_target_group(Name=f"drain-{os.getpid()}-{int(time.time())}", Protocol="HTTP",
                                    Port=3000, VpcId=vpc, TargetType="ip")["TargetGroups"][0]
    return str(arn["TargetGroupArn"])


def start_watcher(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "echo.targets.aws.drain_watch"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


async def test_the_alb_draining_a_task_starts_echos_drain(moto_server: MotoServer,
                                                         tmp_path: Path) -> None:
    elbv2 = moto_server.client("elbv2")
    group = target_group(moto_server)
    elbv2.register_targets(TargetGroupArn=group, Targets=[{"Id": TASK_IP, "Port": 3000}])
    server = EchoProcess(make_project(tmp_path / "drain"), command="serve").start()
    assert server.process is not None
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_ENDPOINT_URL": moto_server.url, "ECHO_AWS_REGION": "us-east-1",
           "ECHO_TARGET_GROUP_ARN": group, "ECHO_TARGET_IP": TASK_IP, "ECHO_PORT": "3000",
           "ECHO_DRAIN_PID": str(server.process.pid), "ECHO_DRAIN_POLL": "0.3"}
    watcher = start_watcher(env)
    client = await connect(server)
    try:
        await client.call("subscribe", {"channels": ["plain"]})
        await asyncio.sleep(1.5)  # several polls while registered: nothing happens
        assert client.received["error"] == [] and server.process.poll() is None
        elbv2.deregister_targets(TargetGroupArn=group, Targets=[{"Id": TASK_IP, "Port": 3000}])
        await client.wait_for("error", 1, timeout=15)
        assert [e["code"] for e in client.received["error"]] == ["server_shutdown"]
        assert server.process.wait(timeout=20) is not None  # and the node went down by itself
        output, _ = watcher.communicate(timeout=10)
        assert "starting Echo's drain now" in output, output
    finally:
        await client.disconnect()
        watcher.kill()
        server.stop()


def test_without_a_target_group_the_watch_does_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "echo.targets.aws.drain_watch"],
                          env={k: v for k, v in os.environ.items() if not k.startswith("ECHO_")},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and "not watching" in done.stderr

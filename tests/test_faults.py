"""Faults: graceful shutdown, a node killed mid-stream, the associations store unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

import httpx
import pytest
import socketio

from tests.conftest import Client, EchoProcess, RedisServer, connect, free_port, make_project

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_sigterm_finishes_in_flight_messages_then_closes_clients(
    tmp_path: Path, clients: list[Client]
) -> None:
    server = EchoProcess(make_project(tmp_path), command="serve").start()
    try:
        client = await connect(server)
        clients.append(client)
        await client.call("subscribe", {"channels": ["slow"]})
        in_flight = asyncio.create_task(
            client.call("publish", {"channel": "slow", "message": {"delay": 1.0, "n": 1}}))
        await asyncio.sleep(0.2)
        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        ack = await in_flight
        assert ack["ok"] and ack["delivered"], ack
        [message] = await client.wait_for("message")
        assert message["message"]["n"] == 1
        [notice] = await client.wait_for("error")
        assert notice["code"] == "server_shutdown"
        # uvicorn re-raises the signal once shut down, the conventional exit for SIGTERM
        assert server.process.wait(15) in (0, -signal.SIGTERM)
    finally:
        server.stop()


class Balancer:
    """A TCP load balancer on loopback: each new connection goes to the first live backend."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def start(self) -> Balancer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self.backends:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue
        else:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        if self.server:
            self.server.close()


async def test_clients_of_a_killed_node_reconnect_to_another_and_keep_receiving(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    project = make_project(tmp_path)
    env = {"ECHO_REDIS_URL": redis_server.url}
    first = EchoProcess(project, env=env, command="serve").start()
    second = EchoProcess(project, env=env, command="serve").start()
    balancer = await Balancer([first.port, second.port]).start()
    received: list[dict] = []
    client = socketio.AsyncClient(reconnection=True, reconnection_delay=0.1,
                                  reconnection_delay_max=0.5)
    client.on("message", received.append, namespace="/test-app")

    async def resubscribe() -> None:  # what the browser client does on every (re)connect
        await client.emit("subscribe", {"channels": ["plain"]}, namespace="/test-app")

    client.on("connect", resubscribe, namespace="/test-app")
    publisher = await connect(second)
    try:
        await client.connect(f"http://127.0.0.1:{balancer.port}", namespaces=["/test-app"],
                             auth={"jwt": first.token()}, transports=["websocket"])

        async def until_received(text: str) -> None:
            deadline = time.monotonic() + 20
            while text not in [m["message"] for m in received]:
                assert time.monotonic() < deadline, f"never got {text!r}: {received}"
                await publisher.call("publish", {"channel": "plain", "message": text})
                await asyncio.sleep(0.2)

        await until_received("before")  # through the first node
        first.kill()  # SIGKILL: no goodbye
        await until_received("after")  # reconnected through the balancer to the second
        assert second.alive()
    finally:
        await client.disconnect()
        await publisher.disconnect()
        await balancer.close()
        first.stop()
        second.stop()


async def test_unreachable_store_at_start_serves_last_known_good_and_says_so(
    tmp_path: Path, clients: list[Client]
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = EchoProcess(make_project(tmp_path), env={"ECHO_REDIS_URL": closed},
                         command="serve").start(timeout=40)
    try:
        async with httpx.AsyncClient() as http:
            ready = await http.get(server.url + "/ready", headers=server.operator())
        assert ready.status_code == 503
        problems = " ".join(ready.json()["problems"])
        assert "serving the last known good copy from" in problems
        assert "associations.json" in problems and "redis 127.0.0.1:" in problems
        assert ": unreachable" in problems
        client = await connect(server)
        clients.append(client)
        await client.call("subscribe", {"channels": ["angry"]})
        await client.call("publish", {"channel": "angry", "message": "still"})
        [message] = await client.wait_for("message")
        assert message["message"] == "STILL!!!"  # the chain from the durable copy is in force
    finally:
        server.stop()

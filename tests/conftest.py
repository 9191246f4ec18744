"""Shared fixtures: a real ``echoctl dev`` process on a free port, and real Socket.IO clients.

Each test module gets its own project folder (the repo's demo functions and apps, the test
functions from tests/fixtures, and a test associations file) and its own server process.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import socketio

from echo.core.auth import issue_management_token, issue_token

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SECRET = "test-secret-0123456789abcdef-0123456789"
TEST_APP = "test-app"

TEST_ASSOCIATIONS: dict[str, Any] = {
    "applications": {
        "chat-demo": json.loads((REPO / "associations.json").read_text())["applications"][
            "chat-demo"
        ],
        TEST_APP: {
            "channels": [
                {"channelName": "plain", "functionNames": []},
                {"channelName": "angry", "functionNames": ["demo-angry"]},
                {"channelName": "chain", "functionNames": ["tag-a", "tag-b"]},
                {"channelName": "filtered", "functionNames": ["demo-filter-shouting"]},
                {"channelName": "raise", "functionNames": ["fail-raise"]},
                {"channelName": "hang", "functionNames": ["fail-hang"]},
                {"channelName": "garbage", "functionNames": ["fail-garbage"]},
                {"channelName": "exit", "functionNames": ["fail-exit"]},
                {"channelName": "slow", "functionNames": ["slow-echo"]},
                {"channelName": "slow-unordered", "functionNames": ["slow-echo"],
                 "ordered": False},
                {"channelName": "flaky", "functionNames": ["flaky"]},
                {"channelName": "pass-chain", "functionNames": ["pass-on-error", "demo-angry"]},
                {"channelName": "drop", "functionNames": ["drop-on-error"]},
                {"channelName": "serial:*", "functionNames": ["serial"]},
                {"channelName": "room:*", "functionNames": ["demo-backwards"]},
                {"channelName": "room:exact", "functionNames": ["demo-robot"]},
                {"channelName": "hist:*", "history": {"size": 1000}},
                {"channelName": "hist-small", "history": {"size": 5}},
                {"channelName": "crowd", "presence": "count"},
                {"channelName": "hist-angry", "functionNames": ["demo-angry"], "history": True},
                {"channelName": "hist-filtered", "functionNames": ["demo-filter-shouting"],
                 "history": True},
                {"channelName": "secret", "encrypted": True, "history": True},
                {"channelName": "secret:*", "encrypted": True},
                {"channelName": "vault", "functionNames": ["demo-angry"],
                 "trustedFunctions": ["demo-angry"], "encrypted": True, "history": True},
            ]
        },
    }
}
STARTING_ASSOCIATIONS: dict[str, Any] = json.loads(json.dumps(TEST_ASSOCIATIONS))
"""What a test project starts with: TEST_ASSOCIATIONS plus a channel whose function has no
folder (accepted at start, and reported; a PUT or a file edit naming it is refused)."""
STARTING_ASSOCIATIONS["applications"][TEST_APP]["channels"].append(
    {"channelName": "missing", "functionNames": ["no-such-function"]})


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_project(root: Path) -> Path:
    """A project folder with demo + test functions and the test associations."""
    functions = root / "functions"
    shutil.copytree(REPO / "functions", functions, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in (FIXTURES / "functions").iterdir():
        shutil.copytree(folder, functions / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "apps", root / "apps", ignore=shutil.ignore_patterns("node_modules"))
    (root / "associations.json").write_text(json.dumps(STARTING_ASSOCIATIONS, indent=2))
    return root


class EchoProcess:
    """``python -m echo dev`` (or ``serve``) in a subprocess, on a free port."""

    def __init__(self, project: Path, env: dict[str, str] | None = None,
                 command: str = "dev") -> None:
        self.project = project
        self.command = command
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = project / f"echo-{self.port}.log"
        self.env = {**os.environ, "ECHO_SECRET": SECRET, **(env or {})}
        self.extra_args: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.transport = self.env.get("ECHO_TRANSPORT", "native")

    def start(self, timeout: float = 20) -> EchoProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "echo", self.command, "--project", str(self.project),
             "--port", str(self.port), *self.extra_args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"echo exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"echo did not become healthy within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def token(self, app: str = TEST_APP, admin: bool = False, **kwargs: Any) -> str:
        return issue_token(SECRET, app, admin=admin, **kwargs)

    def management_token(self) -> str:
        return issue_management_token(SECRET)

    def operator(self) -> dict[str, str]:
        """Headers for /ready's details and /metrics on a ``serve`` node."""
        return {"authorization": "Bearer " + self.management_token()}


TRANSPORTS = ("native", "python-socketio")
"""Echo's two wire implementations; modules with ``WIRE_TESTS = True`` run on both."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "WIRE_TESTS", False) and "echo_server" in metafunc.fixturenames:
        metafunc.parametrize("echo_server", TRANSPORTS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def echo_server(request: pytest.FixtureRequest,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    """``echoctl dev`` on a test project; on the native transport unless the module asks for
    both (``WIRE_TESTS``)."""
    transport = getattr(request, "param", "native")
    project = make_project(tmp_path_factory.mktemp(f"project-{transport}"))
    server = EchoProcess(project, env={"ECHO_TRANSPORT": transport}).start()
    server.transport = transport
    yield server
    server.stop()


class Client:
    """A python-socketio AsyncClient on one app namespace that records what it receives."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.namespace = "/" + app
        self.sio = socketio.AsyncClient(reconnection=False)
        self.received: dict[str, list[Any]] = {"message": [], "presence": [], "status": [],
                                               "error": [], "unsubscribed": []}
        for event in self.received:
            self.sio.on(event, self._recorder(event), namespace=self.namespace)

    def _recorder(self, event: str) -> Any:
        def record(data: Any) -> None:
            self.received[event].append(data)
        return record

    @property
    def messages(self) -> list[Any]:
        return self.received["message"]

    async def call(self, event: str, data: Any, timeout: float = 10) -> Any:
        return await self.sio.call(event, data, namespace=self.namespace, timeout=timeout)

    async def emit(self, event: str, *data: Any) -> None:
        await self.sio.emit(event, data[0] if len(data) == 1 else data, namespace=self.namespace)

    async def wait_for(self, event: str, count: int = 1, timeout: float = 5) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.received[event]) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.app}: wanted {count} {event} event(s) within {timeout}s, got "
                    f"{self.received[event]!r}"
                )
            await asyncio.sleep(0.01)
        return self.received[event]

    async def wait_for_match(self, kind: str, timeout: float = 5, **fields: Any) -> Any:
        """The first ``kind`` event received whose fields equal ``fields``, within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for item in self.received[kind]:
                if all(item.get(key) == value for key, value in fields.items()):
                    return item
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.app}: no {kind} with {fields} within {timeout}s: {self.received[kind]!r}"
                )
            await asyncio.sleep(0.01)

    async def disconnect(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()


async def connect(server: EchoProcess, app: str = TEST_APP, *, token: str | None = None,
                  uuid: str | None = None, admin: bool = False) -> Client:
    client = Client(app)
    auth: dict[str, Any] = {"jwt": token if token is not None else server.token(app, admin=admin)}
    if uuid is not None:
        auth["uuid"] = uuid
    await client.sio.connect(server.url, namespaces=[client.namespace], auth=auth,
                             transports=["websocket"], wait_timeout=5)
    return client


NODE_DIR = REPO / "tests" / "node"


def missing_node_clients() -> str | None:
    """Why the Node test clients cannot run here, or None."""
    if shutil.which("node") is None:
        return "`node` is not on PATH"
    for package in ("ekko-realtime-client", "socket.io-client"):
        if not (NODE_DIR / "node_modules" / package / "package.json").is_file():
            return f"tests/node/node_modules/{package} is missing"
    return None


def require_node_clients() -> None:
    """Skip loudly without Node and the npm test clients; under CI=true, fail instead."""
    missing = missing_node_clients()
    if missing is None:
        return
    reason = (
        f"NODE CLIENT TESTS NOT RUN: {missing}. Install Node.js 18+ and run "
        "`npm ci --prefix tests/node` (scripts/test does both checks and the install)."
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class RedisServer:
    """A private ``redis-server`` on a free port; ``stop``/``start`` keep the port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
            pytest.skip("SKIPPED LOUDLY: redis-server is not installed; "
                        "`apt-get install -y redis-server` to run the Redis tests")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not listen on {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class MotoServer:
    """moto's AWS API server on a free port (the AWS emulator for tests)."""

    def __init__(self, workdir: Path, use_docker: bool = False) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.use_docker = use_docker
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20) -> MotoServer:
        binary = Path(sys.executable).parent / "moto_server"
        log = (self.workdir / "moto.log").open("ab")
        self.process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                # without Docker, moto's Lambda invoke echoes the payload back
                reply = httpx.post(self.url + "/moto-api/config",
                                   json={"lambda": {"use_docker": self.use_docker}}, timeout=1)
                if reply.is_success:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"moto_server did not start on {self.port}")

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Collects clients a test opens and disconnects them afterwards."""
    opened: list[Client] = []
    yield opened
    for client in opened:
        await client.disconnect()

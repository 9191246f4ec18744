"""Echo as containers: compose.yaml, the Dockerfile, Echo and Redis under testcontainers,
and `echoctl deploy --target docker` end to end.

Needs a Docker engine (scripts/docker-ci.sh starts one in CI and builds the local base
image ECHO_TEST_BASE_IMAGE, which has python3, redis-server and nginx; without it the
public python/redis/nginx images are used). Containers are reached only through ports
published on 127.0.0.1. Without an engine these tests skip, saying why; with CI=true they
fail instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from echo.config import load_settings
from echo.core.auth import issue_token
from echo.targets.docker import DockerTarget
from tests.conftest import REPO, SECRET, TEST_APP, TEST_ASSOCIATIONS, Client, free_port, make_project

pytestmark = pytest.mark.docker

BASE_IMAGE = os.environ.get("ECHO_TEST_BASE_IMAGE") or None
REDIS_IMAGE = BASE_IMAGE or "redis:7"
PUBLIC_IMAGES = ("python:3.11-slim-bookworm", "redis:7", "nginx:1.27")  # the defaults
IMAGE_TAG = "echo-realtime:test"


def not_run(reason: str) -> NoReturn:
    message = f"DOCKER TESTS NOT RUN: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


_engine: Any = None


def engine() -> Any:
    """A docker SDK client on an engine that answers, or skip (fail under CI=true)."""
    global _engine
    if _engine is None:
        import docker

        try:
            client = docker.from_env(timeout=300)
            client.ping()
        except Exception as exc:
            not_run(f"no Docker engine answers ({exc}); run ./scripts/test as root "
                    "(it starts dockerd) or start Docker")
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
        os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
        _engine = client
    return _engine


def require_image(name: str) -> None:
    import docker.errors

    client = engine()
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(name)
        except docker.errors.APIError as exc:
            not_run(f"image {name} is not here and cannot be pulled ({exc.explanation}); "
                    "`source scripts/docker-ci.sh` builds a local base image")


def wait_until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.2)


def publish_port(container: Any, port: int, host_port: int | None = None) -> None:
    """Publish ``port`` on 127.0.0.1 only (testcontainers alone would use every address)."""
    container.ports[f"{port}/tcp"] = ("127.0.0.1", host_port) if host_port else ("127.0.0.1",)


class ContainerRedis:
    """Redis in a container (testcontainers) on a fixed 127.0.0.1 port; ``stop``/``start``
    keep the port, like conftest's RedisServer."""

    def __init__(self, network: Any = None) -> None:
        from testcontainers.core.container import DockerContainer

        engine()
        require_image(REDIS_IMAGE)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.container = DockerContainer(REDIS_IMAGE, command=[
            "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "",
            "--appendonly", "no"])
        publish_port(self.container, 6379, self.port)
        if network is not None:
            self.container.with_network(network).with_network_aliases("redis")
        self.started = False

    def start(self, timeout: float = 30) -> ContainerRedis:
        if self.started:
            self.container.get_wrapped_container().start()
        else:
            self.container.start()
            self.started = True

        def answers() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        wait_until(answers, f"Redis on 127.0.0.1:{self.port}", timeout)
        return self

    def stop(self) -> None:
        """Kill redis-server (as the process test does); the container keeps its port."""
        self.container.get_wrapped_container().kill()

    def remove(self) -> None:
        if self.started:
            self.container.stop()


# -- (a) compose.yaml ---------------------------------------------------------------------

def compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        not_run("docker-compose is not installed (apt-get install -y docker-compose)")
    return subprocess.run([binary, "-f", str(REPO / "compose.yaml"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_compose_file_is_valid_and_prod_needs_a_secret() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ECHO_SECRET"}
    missing = compose("config", "-q", env=env)
    assert missing.returncode != 0 and "set ECHO_SECRET" in missing.stderr

    env["ECHO_SECRET"] = SECRET
    checked = compose("config", "-q", env=env)
    assert checked.returncode == 0, checked.stderr
    services = compose("--profile", "prod", "config", "--services", env=env)
    assert {"echo", "redis", "localstack", "echo-1", "echo-2", "lb"} <= set(services.stdout.split())
    prod = compose("--profile", "prod", "config", env=env)
    assert prod.returncode == 0, prod.stderr
    for needle in ("echo-1:", "echo-2:", "lb:", "127.0.0.1:8080:8080", "127.0.0.1:3000:3000",
                   "127.0.0.1:4566:4566", "redis://redis:6379/0", "proxy_set_header Upgrade"):
        assert needle in prod.stdout, needle


# -- (b) the image ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def echo_image() -> str:
    """The repository's Dockerfile built on the local base image (or the default one)."""
    import docker.errors

    from echo.targets.docker.images import pip_build_args

    client = engine()
    require_image(BASE_IMAGE or PUBLIC_IMAGES[0])
    buildargs = {**pip_build_args(), **({"BASE_IMAGE": BASE_IMAGE} if BASE_IMAGE else {})}
    started = time.monotonic()
    try:
        image, _ = client.images.build(path=str(REPO), tag=IMAGE_TAG, buildargs=buildargs,
                                       labels={"echo.test": "image"}, rm=True, forcerm=True)
    except docker.errors.BuildError as exc:
        log = "".join(str(line.get("stream", line.get("error", ""))) for line in exc.build_log)
        pytest.fail(f"docker build failed: {exc}\n{log[-3000:]}")
    print(f"\nimage build: {time.monotonic() - started:.1f}s")
    client.images.prune(filters={"dangling": True, "label": "echo.test=image"})  # earlier builds
    return str(image.id)


def test_image_builds_from_the_dockerfile_and_runs_as_a_non_root_user(echo_image: str) -> None:
    client = engine()
    config = client.images.get(echo_image).attrs["Config"]
    assert config["User"] == "10001"
    assert config["WorkingDir"] == "/app"
    assert "3000/tcp" in config["ExposedPorts"]
    assert "ECHO_HOST=0.0.0.0" in config["Env"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert config["Cmd"] == ["echoctl", "serve"]
    listing = client.containers.run(
        echo_image, ["sh", "-c", "id -u && ls /app /app/functions && echoctl version"],
        remove=True).decode()
    assert listing.split()[0] == "10001"
    assert "associations.json" in listing and "demo-angry" in listing


# -- (c) Echo and Redis containers under testcontainers -----------------------------------

class EchoContainer:
    """`echoctl serve` in a container, published on a 127.0.0.1 port; quacks like EchoProcess."""

    def __init__(self, image: str, network: Any) -> None:
        from testcontainers.core.container import DockerContainer

        self.container = (DockerContainer(image).with_network(network)
                          .with_env("ECHO_SECRET", SECRET)
                          .with_env("ECHO_REDIS_URL", "redis://redis:6379/0"))
        publish_port(self.container, 3000)
        self.url = ""

    def start(self, timeout: float = 60) -> EchoContainer:
        self.container.start()
        self.url = f"http://127.0.0.1:{self.container.get_exposed_port(3000)}"
        try:
            wait_until(lambda: httpx.get(self.url + "/ready", timeout=1).status_code == 200,
                       f"{self.url}/ready", timeout)
        except AssertionError:
            out, err = self.container.get_logs()
            raise AssertionError(f"{self.url} not ready:\n{(out + err).decode()[-2000:]}") from None
        return self

    def token(self, app: str = TEST_APP, admin: bool = False, **kwargs: Any) -> str:
        return issue_token(SECRET, app, admin=admin, **kwargs)


@pytest.fixture(scope="module")
def echo_pair(echo_image: str) -> Iterator[list[EchoContainer]]:
    from testcontainers.core.network import Network

    with Network() as network:
        redis = ContainerRedis(network).start()
        nodes = [EchoContainer(echo_image, network) for _ in range(2)]
        try:
            for node in nodes:
                node.start()
            yield nodes
        finally:
            for node in nodes:
                node.container.stop()
            redis.remove()


async def connect_to(url: str, app: str, token: str) -> Client:
    client = Client(app)
    await client.sio.connect(url, namespaces=[client.namespace], auth={"jwt": token},
                             transports=["websocket"], wait_timeout=5)
    return client


@pytest.mark.anyio
async def test_publish_on_one_container_reaches_a_subscriber_on_the_other(
    echo_pair: list[EchoContainer], clients: list[Client]
) -> None:
    first, second = echo_pair
    subscriber = await connect_to(second.url, "chat-demo", second.token("chat-demo"))
    publisher = await connect_to(first.url, "chat-demo", first.token("chat-demo"))
    clients += [subscriber, publisher]
    await subscriber.call("subscribe", {"channels": ["angry"]})
    ack = await publisher.call("publish", {"channel": "angry", "message": "hello"})
    assert ack["ok"] and ack["delivered"], ack
    [message] = await subscriber.wait_for("message", timeout=10)
    assert message["message"] == "HELLO!!!"  # demo-angry ran once, on the publishing node
    assert message["id"] == ack["id"]


# -- (d) echoctl deploy --target docker ---------------------------------------------------

def echoctl(project: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("ECHO_SECRET", None)
    return subprocess.run([sys.executable, "-m", "echo", *args, "-C", str(project)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def context_digest(project: Path) -> str:
    """What the image is built from (Echo's sources and the project), as a digest."""
    from echo.targets.docker.images import build_context, echo_source

    return hashlib.sha256(build_context(load_settings(project), echo_source())).hexdigest()


def replica_connections(container: Any, secret: str) -> float:
    from echo.core.auth import issue_management_token

    operator = issue_management_token(secret)  # /metrics is for operators on `serve`
    probe = ("import urllib.request as u; print(u.urlopen(u.Request('http://127.0.0.1:3000/"
             f"metrics', headers={{'Authorization': 'Bearer {operator}'}})).read().decode())")
    text = container.exec_run(["python", "-c", probe]).output.decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(f'echo_connections{{app="{TEST_APP}"}}'))


@pytest.mark.anyio
async def test_deploy_chat_through_two_replicas_status_and_teardown(
    tmp_path: Path, clients: list[Client]
) -> None:
    client = engine()
    project = make_project(tmp_path / "project")
    options = ["-o", f"port={free_port()}"] + (["-o", f"base_image={BASE_IMAGE}"] if BASE_IMAGE else [])
    for image in [BASE_IMAGE] if BASE_IMAGE else PUBLIC_IMAGES:
        require_image(image)
    label = f"echo.project={DockerTarget(load_settings(project), {}).project}"
    state_path = project / ".echo" / "targets" / "docker.json"
    try:
        context = context_digest(project)
        started = time.monotonic()
        deployed = echoctl(project, "deploy", "--target", "docker", *options)
        took = time.monotonic() - started
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        state = json.loads(state_path.read_text())
        assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
        assert state["secret"] not in deployed.stdout + deployed.stderr

        # the same project again: same image, every container left as it was (unless Echo's
        # sources were edited meanwhile, in a working tree someone else is editing)
        before = sorted(c.id for c in client.containers.list(all=True, filters={"label": label}))
        started = time.monotonic()
        again = echoctl(project, "deploy", "--target", "docker", *options)
        took_again = time.monotonic() - started
        assert again.returncode == 0, again.stdout + again.stderr
        after = sorted(c.id for c in client.containers.list(all=True, filters={"label": label}))
        unchanged = context_digest(project) == context
        if unchanged:
            assert json.loads(state_path.read_text())["details"]["image_id"] == state["details"]["image_id"]
            assert after == before, again.stderr
            assert "creating" not in again.stderr, again.stderr
        print(f"\ndeploy: {took:.1f}s, re-deploy: {took_again:.1f}s (sources unchanged: {unchanged})")
        replicas = client.containers.list(filters={"label": [label, "echo.role=echo"]})
        assert len(replicas) == 2

        tokens = json.loads(echoctl(project, "jwt", TEST_APP, "--json", "--target", "docker").stdout)
        endpoint = tokens["endpoint"]
        assert endpoint.startswith("http://127.0.0.1:")
        subscribers: list[Client] = []
        deadline = time.monotonic() + 30
        while not all(replica_connections(r, state["secret"]) >= 1 for r in replicas):  # nginx round-robins
            assert time.monotonic() < deadline and len(subscribers) < 8, "a replica got no client"
            subscriber = await connect_to(endpoint, TEST_APP, tokens["jwt"])
            subscribers.append(subscriber)
            clients.append(subscriber)
            await subscriber.call("subscribe", {"channels": ["angry", "plain"]})
        ack = await subscribers[0].call("publish", {"channel": "angry", "message": "hi"})
        assert ack["ok"], ack
        for subscriber in subscribers:
            [message] = await subscriber.wait_for("message", timeout=10)
            assert message["message"] == "HI!!!" and message["id"] == ack["id"]

        # associations push: through the load balancer to one replica, Redis spreads it
        document = json.loads(json.dumps(TEST_ASSOCIATIONS))
        document["applications"][TEST_APP]["channels"][0]["functionNames"] = ["demo-backwards"]
        (project / "associations.json").write_text(json.dumps(document))
        pushed = echoctl(project, "associations", "push", "--target", "docker")
        assert pushed.returncode == 0, pushed.stderr
        await subscribers[-1].call("publish", {"channel": "plain", "message": "abc"})
        for subscriber in subscribers:
            messages = await subscriber.wait_for("message", 2, timeout=10)
            assert messages[-1]["message"] == "cba"

        shown = echoctl(project, "status", "--target", "docker")
        assert shown.returncode == 0, shown.stderr
        status = json.loads(shown.stdout)
        assert status["endpoint"] == endpoint
        roles = sorted(c["role"] for c in status["containers"])
        assert roles == ["echo", "echo", "lb", "redis"]
        assert all(c["state"] == "running" for c in status["containers"])
    finally:
        for subscriber in clients:
            await subscriber.disconnect()
        removed = echoctl(project, "teardown", "--target", "docker", "--yes",
                          "-o", "remove_image=yes")
    assert removed.returncode == 0, removed.stderr
    assert client.images.list(filters={"label": label}) == []
    assert client.containers.list(all=True, filters={"label": label}) == []
    assert client.networks.list(filters={"label": label}) == []
    assert not state_path.exists()
    assert json.loads(echoctl(project, "status", "--target", "docker").stdout) == {}


def running_replicas(client: Any, label: str) -> list[str]:
    return sorted(c.id for c in client.containers.list(filters={"label": [label, "echo.role=echo"]}))


@pytest.mark.anyio
@pytest.mark.slow
async def test_redeploy_under_load_replaces_replicas_one_at_a_time(tmp_path: Path) -> None:
    """A redeploy while clients publish and listen: replicas go one at a time, each drained
    (its clients hear ``server_shutdown`` and reconnect to the other), and every client
    gets every message once, in order (history recovery across the switch)."""
    import asyncio

    from echo.sdk import AsyncServerApi, EchoError, RealtimeClient

    client = engine()
    project = make_project(tmp_path / "rolling")
    options = ["-o", f"port={free_port()}"] + (["-o", f"base_image={BASE_IMAGE}"] if BASE_IMAGE else [])
    for image in [BASE_IMAGE] if BASE_IMAGE else PUBLIC_IMAGES:
        require_image(image)
    label = f"echo.project={DockerTarget(load_settings(project), {}).project}"
    listeners: list[RealtimeClient] = []
    try:
        deployed = await asyncio.to_thread(echoctl, project, "deploy", "--target", "docker", *options)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        secret = json.loads((project / ".echo" / "targets" / "docker.json").read_text())["secret"]
        tokens = json.loads(echoctl(project, "jwt", TEST_APP, "--json", "--target", "docker").stdout)
        endpoint, token = tokens["endpoint"], tokens["jwt"]
        old = running_replicas(client, label)
        assert len(old) == 2

        got: list[list[int]] = []
        notices: list[list[str]] = []
        for _ in range(4):
            listener = RealtimeClient(endpoint, TEST_APP, get_token=lambda: token)
            seen: list[int] = []
            heard: list[str] = []
            listener.on("message", lambda m, seen=seen: seen.append(m["message"]["n"]))
            listener.on("error", lambda e, heard=heard: heard.append(e.get("code", "")))
            listener.on("state", lambda s, heard=heard: heard.append(s["state"]))
            await listener.connect()
            await listener.subscribe(["hist:rolling"])
            listeners.append(listener)
            got.append(seen)
            notices.append(heard)

        timeline: list[tuple[float, list[str]]] = []
        stop = asyncio.Event()
        published = 0
        retries = 0

        async def publish() -> None:
            nonlocal published, retries
            async with AsyncServerApi(endpoint, TEST_APP, secret=secret, timeout=5) as api:
                while not stop.is_set():
                    try:  # a retry of the same number is the same message (idempotency key)
                        await api.publish("hist:rolling", {"n": published},
                                          idempotency_key=f"n-{published}")
                        published += 1
                    except EchoError:
                        retries += 1
                    await asyncio.sleep(0.05)

        async def watch() -> None:
            started = time.monotonic()
            while not stop.is_set():
                ids = await asyncio.to_thread(running_replicas, client, label)
                timeline.append((time.monotonic() - started, ids))
                await asyncio.sleep(0.2)

        tasks = [asyncio.create_task(publish()), asyncio.create_task(watch())]
        await asyncio.sleep(2)
        handler = project / "functions" / "demo-angry" / "handler.py"  # a new image
        handler.write_text(handler.read_text() + "\n# redeployed\n")
        started = time.monotonic()
        redeployed = await asyncio.to_thread(echoctl, project, "deploy", "--target", "docker", *options)
        took = time.monotonic() - started
        assert redeployed.returncode == 0, redeployed.stdout + redeployed.stderr
        await asyncio.sleep(3)
        stop.set()
        await asyncio.gather(*tasks)
        for _ in range(100):  # up to 20 s for the last recoveries
            if all(len(seen) >= published for seen in got):
                break
            await asyncio.sleep(0.2)

        new = running_replicas(client, label)
        print(f"\nredeploy under load: {took:.1f}s, {published} published ({retries} retried), "
              f"received {[len(s) for s in got]}; replicas {[len(ids) for _, ids in timeline]}")
        assert len(new) == 2 and not set(new) & set(old)
        # never without a replica, and the old ones left one at a time
        assert all(ids for _, ids in timeline), timeline
        gone_at = [next(t for t, ids in timeline if replica not in ids) for replica in old]
        assert abs(gone_at[0] - gone_at[1]) > 0.5, gone_at
        # nothing lost, nothing twice, in order, on every client
        for seen in got:
            assert seen == list(range(published)), (len(seen), published, seen[:5])
        # moved by the drain: every client heard the shutdown notice and came back
        for heard in notices:
            assert "server_shutdown" in heard and heard[-1] == "connected", heard
    finally:
        for listener in listeners:
            await listener.close()
        echoctl(project, "teardown", "--target", "docker", "--yes", "-o", "remove_image=yes")

"""Function runners (local, lambda on moto, http) and per-function policy, through a server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from echo.core.functions import FunctionCatalog, FunctionSpec
from echo.core.runners import FunctionError, InvocationContext
from echo.packaging import build_zip
from echo.runners.lambda_runner import LambdaRunner, _error_from_payload
from tests.conftest import (
    TEST_ASSOCIATIONS,
    Client,
    EchoProcess,
    MotoServer,
    connect,
    make_project,
)

pytestmark = pytest.mark.anyio


# -- per-function policy with the local runner ---------------------------------------------


async def test_retries_rerun_a_failing_function(
    echo_server: EchoProcess, clients: list[Client], tmp_path: Path
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": ["flaky"]})
    counter = tmp_path / "calls"
    ack = await client.call("publish", {"channel": "flaky", "message": {
        "counter": str(counter), "fail_times": 2}})
    assert ack["delivered"], ack
    [message] = await client.wait_for("message")
    assert message["message"]["calls"] == 3  # two failures, retried twice (retries = 2)

    counter.unlink()
    ack = await client.call("publish", {"channel": "flaky", "message": {
        "counter": str(counter), "fail_times": 3}})
    assert ack["error"]["kind"] == "raised" and "flaky failure 3" in ack["error"]["message"]
    assert counter.read_text() == "3"  # 1 + 2 retries, then it gave up


async def test_on_error_pass_lets_the_message_go_on_unchanged(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    admin = await connect(echo_server, admin=True)
    clients += [client, admin]
    await client.call("subscribe", {"channels": ["pass-chain"]})
    ack = await client.call("publish", {"channel": "pass-chain", "message": "hi"})
    assert ack["ok"] and ack["delivered"]
    [message] = await client.wait_for("message")
    assert message["message"] == "HI!!!"  # pass-on-error failed, demo-angry still ran
    report = await admin.wait_for_match("status", event="function_error")
    assert report["function"] == "pass-on-error" and report["durationMs"] >= 0


async def test_on_error_drop_acks_without_delivering(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    await client.call("subscribe", {"channels": ["drop"]})
    ack = await client.call("publish", {"channel": "drop", "message": "x"})
    assert ack["ok"] is True and ack["delivered"] is False and ack["droppedBy"] == "drop-on-error"
    await asyncio.sleep(0.2)
    assert client.messages == []


async def test_concurrency_limit_serialises_a_function(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    clients.append(client)
    channels = [f"serial:{n}" for n in range(6)]
    await client.call("subscribe", {"channels": channels})
    acks = await asyncio.gather(*(client.call("publish", {"channel": c, "message": {"c": c}})
                                  for c in channels))
    assert all(a["delivered"] for a in acks)
    runs = sorted((m["message"]["start"], m["message"]["end"])
                  for m in await client.wait_for("message", len(channels)))
    for (_, end), (start, _) in itertools.pairwise(runs):
        assert start >= end, f"two invocations of a concurrency=1 function overlapped: {runs}"


# -- deterministic packaging ---------------------------------------------------------------


async def test_a_backlog_shares_workers_and_only_the_failing_invocation_fails(
    tmp_path: Path,
) -> None:
    """The local runner hands a backlog to a worker in batches; a call that hangs or crashes
    its worker mid-batch fails alone, and the calls it held up run on a fresh worker."""
    from echo.emulator.local_runner import LocalRunner

    code = {
        "double": "def handler(event, context):\n    return event * 2\n",
        "hang": "import time\ndef handler(event, context):\n    time.sleep(60)\n",
        "crash": "import os\ndef handler(event, context):\n    os._exit(3)\n",
    }
    specs = {}
    for name, source in code.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "handler.py").write_text(source)
        specs[name] = FunctionSpec(name, path=tmp_path / name, timeout=1)
    runner = LocalRunner(tmp_path, max_workers=1)
    await runner.start()
    try:
        context = InvocationContext(app="a", channel="c", uuid=None, message_id="m")
        plan = [("double", n) for n in range(40)]
        plan[5] = ("hang", 0)
        plan[30] = ("crash", 0)
        results = await asyncio.wait_for(asyncio.gather(
            *(runner.invoke(specs[name], value, context) for name, value in plan),
            return_exceptions=True), 60)
        for (name, value), result in zip(plan, results, strict=True):
            if name == "hang":
                assert isinstance(result, FunctionError) and result.kind == "timeout"
            elif name == "crash":
                assert isinstance(result, FunctionError) and result.kind == "crashed"
                assert "exited with code 3" in result.detail
            else:
                assert result == value * 2, (value, result)
    finally:
        await runner.close()


def test_packages_are_byte_identical_for_the_same_inputs(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    catalog = FunctionCatalog(project / "functions")
    first = build_zip(catalog.get("demo-angry"))
    handler = project / "functions" / "demo-angry" / "handler.py"
    (project / "functions" / "demo-angry" / "__pycache__").mkdir()
    (project / "functions" / "demo-angry" / "__pycache__" / "x.pyc").write_bytes(b"junk")
    handler.touch()  # a new mtime must not change the bytes
    time.sleep(0.01)
    assert build_zip(catalog.get("demo-angry")).data == first.data
    handler.write_text(handler.read_text() + "\n# changed\n")
    assert build_zip(catalog.get("demo-angry")).sha256 != first.sha256


def test_requirements_are_installed_into_the_package(tmp_path: Path) -> None:
    project = make_project(tmp_path)
    folder = project / "functions" / "demo-angry"
    (folder / "requirements.txt").write_text("six==1.16.0\n")
    package = build_zip(FunctionCatalog(project / "functions").get("demo-angry"))
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(package.data)).namelist()
    assert "six.py" in names and "handler.py" in names and "requirements.txt" in names
    assert not any(n.endswith(".pyc") or ".dist-info/" in n for n in names)
    again = build_zip(FunctionCatalog(project / "functions").get("demo-angry"))
    assert again.data == package.data


# -- lambda runner against moto's server, through `echoctl dev --functions localstack` ------


@pytest.fixture(scope="module")
def lambda_dev(tmp_path_factory: pytest.TempPathFactory,
               moto_server: MotoServer) -> Iterator[EchoProcess]:
    project = make_project(tmp_path_factory.mktemp("lambda-project"))
    server = EchoProcess(project, env={"ECHO_LAMBDA_ENDPOINT_URL": moto_server.url,
                                       "AWS_ACCESS_KEY_ID": "test",
                                       "AWS_SECRET_ACCESS_KEY": "test"})
    server.extra_args = ["--functions", "localstack"]
    yield server.start(timeout=60)
    server.stop()


async def test_dev_with_localstack_deploys_every_function_and_invokes_there(
    lambda_dev: EchoProcess, moto_server: MotoServer, clients: list[Client]
) -> None:
    client = moto_server.client("lambda")
    deployed = {f["FunctionName"]: f for f in client.list_functions()["Functions"]}
    assert "echo-dev-demo-angry" in deployed and "echo-dev-slow-echo" in deployed
    angry = deployed["echo-dev-demo-angry"]
    assert angry["Handler"] == "handler.handler" and angry["Runtime"] == "python3.12"
    # the deployed code is exactly the deterministic package of the folder
    package = build_zip(FunctionCatalog(lambda_dev.project / "functions").get("demo-angry"))
    assert angry["CodeSha256"] == base64.b64encode(hashlib.sha256(package.data).digest()).decode()

    subscriber = await connect(lambda_dev, "chat-demo")
    clients.append(subscriber)
    await subscriber.call("subscribe", {"channels": ["emoji"]})
    ack = await subscriber.call("publish", {"channel": "emoji", "message": {"text": "hi"}})
    assert ack["ok"] and ack["delivered"], ack
    [message] = await subscriber.wait_for("message")
    # moto without a Docker engine answers an invoke with the payload it was given: the
    # request went through the whole chain (2 invocations) and came back intact
    assert message["message"] == {"text": "hi"}


async def test_unreachable_lambda_endpoint_is_a_function_error() -> None:
    from tests.conftest import free_port

    runner = LambdaRunner(f"http://127.0.0.1:{free_port()}", "us-east-1", "echo-")
    await runner.start()
    try:
        with pytest.raises(FunctionError) as info:
            await runner.invoke(FunctionSpec("f", timeout=2), "x",
                                InvocationContext("app", "ch", "u", "m-1"))
    finally:
        await runner.close()
    assert info.value.kind == "failed" and "Lambda unreachable" in info.value.detail


@pytest.mark.parametrize(
    ("payload", "kind", "detail"),
    [
        (b'{"errorMessage": "boom", "errorType": "ValueError"}', "raised", "ValueError: boom"),
        (b'{"errorMessage": "2026-01-01 Task timed out after 3.00 seconds"}', "timeout", "timed out"),
        (b'{"errorMessage": "Unable to marshal response", "errorType": "Runtime.MarshalError"}',
         "bad_result", "marshal"),
        (b"not json at all", "raised", "not json at all"),
    ],
)
def test_lambda_error_documents_map_to_kinds(payload: bytes, kind: str, detail: str) -> None:
    error = _error_from_payload("f", payload)
    assert error.kind == kind and detail in error.detail


async def test_editing_a_function_redeploys_only_that_function(
    lambda_dev: EchoProcess, moto_server: MotoServer
) -> None:
    client = moto_server.client("lambda")

    def shas() -> dict[str, str]:
        return {f["FunctionName"]: f["CodeSha256"] for f in client.list_functions()["Functions"]}

    before = shas()
    handler = lambda_dev.project / "functions" / "demo-backwards" / "handler.py"
    handler.write_text(handler.read_text() + "\n# edited\n")
    deadline = time.monotonic() + 10
    while shas()["echo-dev-demo-backwards"] == before["echo-dev-demo-backwards"]:
        assert time.monotonic() < deadline, "the edited function was not redeployed"
        await asyncio.sleep(0.1)
    after = shas()
    changed = {name for name in after if after[name] != before.get(name)}
    assert changed == {"echo-dev-demo-backwards"}


# -- http runner against a local endpoint --------------------------------------------------


class _Endpoint(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        route = self.path.strip("/")
        if route == "upper":
            reply = {"text": body["text"].upper(), "channel": self.headers["x-echo-channel"]}
            self._send(200, json.dumps(reply).encode())
        elif route == "filter":
            self._send(204, b"")
        elif route == "fail":
            self._send(500, b"upstream exploded")
        elif route == "garbage":
            self._send(200, b"<html>not json")
        elif route == "slow":
            time.sleep(2)
            self._send(200, b"null")

    def _send(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the runner gave up at its timeout (the http-slow case)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def http_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    endpoint = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=endpoint.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{endpoint.server_address[1]}"
    project = make_project(tmp_path_factory.mktemp("http-project"))
    channels = []
    for route in ("upper", "filter", "fail", "garbage", "slow"):
        folder = project / "functions" / f"http-{route}"
        folder.mkdir()
        (folder / "function.toml").write_text(
            f'runner = "http"\nurl = "{base}/{route}"\ntimeout = 0.5\n')
        channels.append({"channelName": f"http-{route}", "functionNames": [f"http-{route}"]})
    document = json.loads(json.dumps(TEST_ASSOCIATIONS))
    document["applications"]["test-app"]["channels"] += channels
    (project / "associations.json").write_text(json.dumps(document))
    server = EchoProcess(project).start()
    yield server
    server.stop()
    endpoint.shutdown()


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ("http-upper", {"delivered": {"text": "HI", "channel": "http-upper"}}),
        ("http-filter", {"filteredBy": "http-filter"}),
        ("http-fail", {"kind": "raised", "detail": "HTTP 500: upstream exploded"}),
        ("http-garbage", {"kind": "bad_result", "detail": "not JSON"}),
        ("http-slow", {"kind": "timeout", "detail": "within 0.5s"}),
    ],
)
async def test_http_runner(http_dev: EchoProcess, clients: list[Client], channel: str,
                           expected: dict[str, Any]) -> None:
    client = await connect(http_dev)
    clients.append(client)
    await client.call("subscribe", {"channels": [channel]})
    ack = await client.call("publish", {"channel": channel, "message": {"text": "hi"}})
    if "delivered" in expected:
        [message] = await client.wait_for("message")
        assert message["message"] == expected["delivered"]
    elif "filteredBy" in expected:
        assert ack["ok"] and ack["filteredBy"] == expected["filteredBy"]
    else:
        assert ack["error"]["kind"] == expected["kind"]
        assert expected["detail"] in ack["error"]["message"]
    # a local function on the same server still works beside http ones
    await client.call("subscribe", {"channels": ["angry"]})
    before = len(client.messages)
    await client.call("publish", {"channel": "angry", "message": "ok"})
    assert (await client.wait_for("message", before + 1))[-1]["message"] == "OK!!!"

"""JavaScript functions as Ekko's users wrote them: an Ekko project's ``ekko_functions/``
folder (function folders with ``index.js`` beside ``associations.json``) runs unchanged under
``echoctl dev`` in Node worker processes, with hot reload, failures reported like Python's,
``package.json`` dependencies installed, and the same folder deploying to Lambda as a Node
function (moto)."""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from echo.core.functions import load_spec
from echo.packaging import build_zip
from echo.runners.lambda_deploy import LambdaDeployer
from tests.conftest import Client, EchoProcess, MotoServer, connect

pytestmark = [pytest.mark.anyio, pytest.mark.node]

# exactly what Ekko's CLI writes for `ekko create` (src/util/ekkoFunction.js), then edited
EKKO_TEMPLATE = """exports.handler = async (message) => {
  // Implement ekko function
  return message;
};"""
SHOUT = EKKO_TEMPLATE.replace("  return message;",
                              "  console.log('shouting', message);\n"
                              "  return { ...message, text: message.text.toUpperCase() };")
KEBAB = """const kebabCase = require("lodash.kebabcase");
exports.handler = async (message) => kebabCase(message);
"""
ESM = """export const handler = (message, context) =>
  `${message} via ${context.clientContext.custom.channel}`;
"""


def ekko_functions(root: Path) -> Path:
    """An Ekko project's ekko_functions/ folder, as Ekko's CLI lays it out."""
    folder = root / "ekko_functions"
    folder.mkdir()
    (folder / ".ekko_functions.txt").write_text("")
    for name, source, file in (("shout", SHOUT, "index.js"),
                               ("thrower", "exports.handler = async () => { throw new "
                                           "TypeError('no way'); };", "index.js"),
                               ("spinner", "exports.handler = () => { while (true) {} };",
                                "index.js"),
                               ("kebab", KEBAB, "index.js"),
                               ("modern", ESM, "index.mjs")):
        (folder / name).mkdir()
        (folder / name / file).write_text(source)
    (folder / "kebab" / "package.json").write_text(json.dumps(
        {"name": "kebab", "version": "1.0.0", "dependencies": {"lodash.kebabcase": "4.1.1"}}))
    (folder / "spinner" / "function.toml").write_text("timeout = 1\n")
    channels = [{"channelName": name, "functionNames": [name]}
                for name in ("shout", "thrower", "spinner", "kebab", "modern")]
    (folder / "associations.json").write_text(json.dumps(
        {"applications": {"test-app": {"channels": channels}}}))
    return folder


@pytest.fixture
def ekko_project(tmp_path: Path) -> Iterator[EchoProcess]:
    server = EchoProcess(ekko_functions(tmp_path)).start()
    yield server
    server.stop()


async def publish(client: Client, channel: str, message: object) -> dict:
    return await client.call("publish", {"channel": channel, "message": message}, timeout=15)


async def test_an_ekko_project_runs_unchanged_in_node_workers(
        ekko_project: EchoProcess, clients: list[Client]) -> None:
    client = await connect(ekko_project)
    clients.append(client)
    await client.call("subscribe", {"channels": ["shout", "modern"]})
    ack = await publish(client, "shout", {"text": "hello"})
    assert ack["ok"] and ack["delivered"], ack
    got = await client.wait_for_match("message", channel="shout")
    assert got["message"] == {"text": "HELLO"}
    assert "shouting { text: 'hello' }" in ekko_project.log()  # console.log: the console

    assert (await publish(client, "modern", "hi"))["ok"]
    assert (await client.wait_for_match("message", channel="modern"))["message"] == "hi via modern"

    raised = await publish(client, "thrower", "x")
    assert raised["error"]["kind"] == "raised" and "TypeError: no way" in raised["error"]["message"]
    started = time.monotonic()
    hung = await publish(client, "spinner", "x")
    assert hung["error"]["kind"] == "timeout", hung
    assert time.monotonic() - started < 5
    assert (await publish(client, "shout", {"text": "still here"}))["ok"]  # nothing stalled

    # hot reload: edit index.js, the next message runs the new code
    source = ekko_project.project / "shout" / "index.js"
    source.write_text(SHOUT.replace("toUpperCase()", "toUpperCase() + '!'"))
    deadline = time.monotonic() + 10
    while True:
        before = len(client.messages)
        await publish(client, "shout", {"text": "again"})
        await client.wait_for("message", before + 1)
        if client.messages[-1]["message"] == {"text": "AGAIN!"}:
            break
        assert time.monotonic() < deadline, client.messages[-3:]
        await asyncio.sleep(0.2)

    # a syntax error is reported on save and the previous code stays in force
    source.write_text("exports.handler = async (message) => {")
    await asyncio.sleep(1.5)
    assert "function shout:" in ekko_project.log()
    assert "the previous code stays in force" in ekko_project.log()
    before = len(client.messages)
    await publish(client, "shout", {"text": "kept"})
    await client.wait_for("message", before + 1)
    assert client.messages[-1]["message"] == {"text": "KEPT!"}


async def test_package_json_dependencies_are_installed(
        ekko_project: EchoProcess, clients: list[Client]) -> None:
    client = await connect(ekko_project)
    clients.append(client)
    await client.call("subscribe", {"channels": ["kebab"]})
    deadline = time.monotonic() + 120  # npm install runs when the server starts
    while not (ack := await publish(client, "kebab", "Hello Big World"))["ok"]:
        assert time.monotonic() < deadline, f"{ack}\n{ekko_project.log()[-2000:]}"
        await asyncio.sleep(0.5)
    assert (await client.wait_for_match("message", channel="kebab"))["message"] == "hello-big-world"
    assert "kebab: packages installed" in ekko_project.log()


def test_functions_new_lang_js_and_a_node_lambda_deploy(tmp_path: Path,
                                                        moto_server: MotoServer) -> None:
    from tests.test_cli_and_config import echoctl

    assert echoctl("init", ".", cwd=tmp_path).returncode == 0
    made = echoctl("functions", "new", "greet", "--lang", "js", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    invoked = echoctl("functions", "invoke", "greet", "-d", '{"a": 1}', cwd=tmp_path)
    assert invoked.returncode == 0 and json.loads(invoked.stdout) == {"a": 1}, invoked.stderr

    (tmp_path / "ekko").mkdir()
    folder = ekko_functions(tmp_path / "ekko")
    spec = load_spec(folder / "kebab")
    assert (spec.language, spec.runtime, spec.handler) == ("javascript", "nodejs20.x",
                                                           "index.handler")
    names = zipfile.ZipFile(io.BytesIO(build_zip(spec).data)).namelist()
    assert "index.js" in names and "node_modules/lodash.kebabcase/index.js" in names
    role = LambdaDeployer.ensure_role(moto_server.client("iam"), "echo-js-test")
    deployer = LambdaDeployer(moto_server.client("lambda"), "echo-js-", role)
    assert deployer.deploy([spec]) == ["kebab"]
    config = deployer.deployed()["kebab"]
    assert config["Runtime"] == "nodejs20.x" and config["Handler"] == "index.handler"

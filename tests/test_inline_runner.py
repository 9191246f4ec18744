"""``runner = "inline"`` (issue 19): trusted Python functions in the server process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from echo.core.functions import discover
from echo.core.runners import FunctionError, FunctionErrorKind, InvocationContext
from echo.runners.inline import InlineRunner
from tests.conftest import EchoProcess, connect, make_project

pytestmark = pytest.mark.anyio
CONTEXT = InvocationContext(app="a", channel="c", uuid="u", message_id="m-1")


def function(root: Path, name: str, source: str, toml: str = 'runner = "inline"\n') -> Path:
    folder = root / "functions" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ("index.js" if "exports." in source else "handler.py")).write_text(source)
    (folder / "function.toml").write_text(toml)
    return folder


@pytest.mark.unit
async def test_inline_functions_run_copied_checked_and_reloaded(tmp_path: Path) -> None:
    function(tmp_path, "shout", "def handler(event, context):\n"
             "    event['text'] = event['text'].upper()\n"
             "    event['channel'] = context.client_context.custom['channel']\n"
             "    return event\n")
    function(tmp_path, "boom", "def handler(event, context):\n    raise ValueError('no')\n")
    function(tmp_path, "garbage", "def handler(event, context):\n    return {1, 2}\n")
    function(tmp_path, "slow", "import asyncio\nasync def handler(event, context):\n"
             "    await asyncio.sleep(5)\n", 'runner = "inline"\ntimeout = 0.2\n')
    function(tmp_path, "js", "exports.handler = async (m) => m;\n")
    specs = discover(tmp_path / "functions")
    runner = InlineRunner()
    event = {"text": "hi"}
    assert await runner.invoke(specs["shout"], event, CONTEXT) == {"text": "HI", "channel": "c"}
    assert event == {"text": "hi"}  # the function changed its own copy
    for name, kind in (("boom", FunctionErrorKind.RAISED), ("garbage", FunctionErrorKind.BAD_RESULT),
                       ("slow", FunctionErrorKind.TIMEOUT), ("js", FunctionErrorKind.LOAD_FAILED)):
        with pytest.raises(FunctionError) as caught:
            await runner.invoke(specs[name], event, CONTEXT)
        assert caught.value.kind == kind, (name, caught.value)
    # a code change is picked up after reload (what the dev watcher calls)
    function(tmp_path, "shout", "def handler(event, context):\n    return {'v': 2}\n")
    assert await runner.invoke(specs["shout"], event, CONTEXT) == {"text": "HI", "channel": "c"}
    runner.reload({"shout"})
    assert await runner.invoke(specs["shout"], event, CONTEXT) == {"v": 2}


@pytest.mark.unit
async def test_inline_functions_keep_their_own_modules_and_strict_results(tmp_path: Path) -> None:
    for name in ("one", "two"):
        folder = function(tmp_path, name, "import helper\n"
                          "def handler(event, context):\n    return helper.WHO\n")
        (folder / "helper.py").write_text(f"WHO = {name.upper()!r}\n")
    function(tmp_path, "nan", "def handler(event, context):\n    return {'x': float('nan')}\n")
    function(tmp_path, "quits", "import sys\ndef handler(event, context):\n    sys.exit(3)\n")
    specs = discover(tmp_path / "functions")
    runner = InlineRunner()
    assert await runner.invoke(specs["one"], {}, CONTEXT) == "ONE"
    assert await runner.invoke(specs["two"], {}, CONTEXT) == "TWO"  # its own helper
    (tmp_path / "functions" / "one" / "helper.py").write_text("WHO = 'ONE, edited'\n")
    runner.reload({"one"})
    assert await runner.invoke(specs["one"], {}, CONTEXT) == "ONE, edited"
    for name, kind in (("nan", FunctionErrorKind.BAD_RESULT), ("quits", FunctionErrorKind.RAISED)):
        with pytest.raises(FunctionError) as caught:
            await runner.invoke(specs[name], {}, CONTEXT)
        assert caught.value.kind == kind, (name, caught.value)


async def test_an_inline_function_on_a_channel_under_echoctl_dev(tmp_path: Path) -> None:
    project = make_project(tmp_path / "inline")
    function(project, "fast-angry", "def handler(event, context):\n"
             "    return {**event, 'text': event['text'].upper() + '!!!'}\n")
    associations = json.loads((project / "associations.json").read_text())
    associations["applications"]["test-app"]["channels"].append(
        {"channelName": "fast", "functionNames": ["fast-angry", "demo-backwards"]})
    (project / "associations.json").write_text(json.dumps(associations))
    server = EchoProcess(project).start()
    client = await connect(server)
    try:
        await client.call("subscribe", {"channels": ["fast"]})
        ack = await client.call("publish", {"channel": "fast", "message": {"text": "hello"}})
        assert ack["ok"], ack
        await client.wait_for("message", 1)
        # inline first, then a worker-run function: both hops applied, in order
        assert client.received["message"][0]["message"]["text"] == "!!!OLLEH"
    finally:
        await client.disconnect()
        server.stop()

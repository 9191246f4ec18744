"""A channel's chain of local Python functions in one worker round trip (issue 19), with
every function's own policy, timeout and error kept as when each is called on its own.

The chain call is taken on ``echoctl serve`` (the dev server's inspector records each hop
with its own call, so it keeps one call per function): these tests run ``serve``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_APP, EchoProcess, connect, make_project

pytestmark = pytest.mark.anyio

CHAINS = {
    "c-two": ["tag-a", "tag-b"],
    "c-pass": ["pass-on-error", "tag-a", "tag-b"],
    "c-drop": ["tag-a", "drop-on-error", "tag-b"],
    "c-filter": ["demo-filter-shouting", "tag-a"],
    "c-garbage": ["tag-a", "fail-garbage"],
    "c-hang": ["tag-a", "fail-hang", "tag-b"],
    "c-exit": ["tag-a", "fail-exit"],
    "c-raise": ["tag-a", "fail-raise", "tag-b"],
}


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    project = make_project(tmp_path_factory.mktemp("chains"))
    associations = json.loads((project / "associations.json").read_text())
    associations["applications"][TEST_APP]["channels"] += [
        {"channelName": name, "functionNames": chain} for name, chain in CHAINS.items()]
    (project / "associations.json").write_text(json.dumps(associations))
    server = EchoProcess(project, command="serve").start()
    yield server
    server.stop()


async def publish(server: EchoProcess, channel: str, text: str) -> tuple[dict[str, Any], list[Any]]:
    client = await connect(server, uuid="ada")
    try:
        await client.call("subscribe", {"channels": [channel]})
        ack = await client.call("publish", {"channel": channel, "message": {"text": text}})
        if ack.get("ok") and ack.get("delivered", True) and not ack.get("filteredBy"):
            await client.wait_for("message", 1, timeout=10)
        return ack, [m["message"] for m in client.received["message"]]
    finally:
        await client.disconnect()


async def chain_calls(server: EchoProcess) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(server.url + "/metrics", headers=server.operator())).text
    (line,) = [x for x in text.splitlines() if x.startswith("echo_function_chain_calls_total ")]
    return float(line.split()[1])


async def test_a_chain_runs_every_function_in_order_in_one_call(serve: EchoProcess) -> None:
    before = await chain_calls(serve)
    ack, got = await publish(serve, "c-two", "hi")
    assert ack["ok"], ack
    assert got[0]["text"] == "hi+a+b"
    assert await chain_calls(serve) == before + 1


async def test_each_function_keeps_its_own_policy_inside_a_chain(serve: EchoProcess) -> None:
    ack, got = await publish(serve, "c-pass", "hi")  # the first fails, on_error = "pass"
    assert ack["ok"] and got[0]["text"] == "hi+a+b", (ack, got)
    ack, got = await publish(serve, "c-drop", "hi")  # the second fails, on_error = "drop"
    assert ack["ok"] and ack.get("droppedBy") == "drop-on-error" and got == [], ack
    ack, got = await publish(serve, "c-filter", "LOUD")  # the first filters
    assert ack["ok"] and ack.get("filteredBy") == "demo-filter-shouting" and got == [], ack


@pytest.mark.parametrize(("channel", "function", "kind"), [
    ("c-raise", "fail-raise", "raised"),
    ("c-garbage", "fail-garbage", "bad_result"),
    ("c-hang", "fail-hang", "timeout"),     # its own 0.5 s, kept inside the one call
    ("c-exit", "fail-exit", "crashed"),     # the worker dies: each function then on its own
])
async def test_a_failure_inside_a_chain_names_its_function(
        serve: EchoProcess, channel: str, function: str, kind: str) -> None:
    ack, got = await publish(serve, channel, "hi")
    assert not ack["ok"] and got == [], ack
    assert ack["error"]["code"] == "function_error"
    assert (ack["error"]["function"], ack["error"]["kind"]) == (function, kind), ack
    # and the channel still works afterwards
    ack, got = await publish(serve, "c-two", "again")
    assert ack["ok"] and got[0]["text"] == "again+a+b"


def test_the_worker_answers_a_chain_in_one_call(tmp_path: Path) -> None:
    """The worker protocol itself: one request with ``chain``, one answer with each result."""
    import subprocess
    import sys

    from tests.conftest import FIXTURES

    functions = FIXTURES / "functions"
    chain = [{"function": name, "path": str(functions / name), "deps": None,
              "handler": "handler.handler", "timeout": 2.0} for name in ("tag-a", "tag-b")]
    request = {"id": 7, "chain": chain, "event": {"text": "x"},
               "context": {"app": "a", "channel": "c", "uuid": "u", "messageId": "m"}}
    done = subprocess.run([sys.executable, "-m", "echo.emulator.worker"], input=json.dumps(request) + "\n",
                          capture_output=True, text=True, timeout=30)
    (answer,) = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert answer["id"] == 7 and answer["ok"] and "failed" not in answer
    assert [r["text"] for r in answer["results"]] == ["x+a", "x+a+b"]
    assert len(answer["seconds"]) == 2

"""Mistakes are caught when they are made: a function saved with a syntax error or without
its handler is reported on the console and to admins at once, and the previous code stays in
force until a good save; a broken function is reported at start; associations that name a
function with no folder, or a channel no client may use, are refused by the file watcher,
``PUT /associations`` and ``echoctl associations check``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from echo.core.associations import AssociationsError, parse_associations
from echo.core.functions import FunctionSpec, missing_functions, source_problem
from tests.conftest import TEST_ASSOCIATIONS, Client, EchoProcess, connect, make_project
from tests.test_cli_and_config import echoctl
from tests.test_live_changes import publish_until, write_associations

pytestmark = pytest.mark.anyio


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EchoProcess]:
    project = make_project(tmp_path)
    broken = project / "functions" / "never-worked"
    broken.mkdir()
    (broken / "handler.py").write_text("def handler(message, context)\n    return message\n")
    started = EchoProcess(project).start()
    yield started
    started.stop()


async def test_a_broken_save_keeps_the_previous_code_in_force_and_says_why(
        server: EchoProcess, clients: list[Client]) -> None:
    admin = await connect(server, "chat-demo", admin=True)
    client = await connect(server, "chat-demo")
    clients += [admin, client]
    await admin.call("subscribe", {"channels": ["admin"]})
    await client.call("subscribe", {"channels": ["angry"]})
    await publish_until(client, "angry", "hi", "HI!!!")
    handler = server.project / "functions" / "demo-angry" / "handler.py"
    good = handler.read_text()

    handler.write_text(good.replace("def transform(text):", "def transform(text)"))
    problem = await admin.wait_for_match("status", event="function_problem")
    assert problem["function"] == "demo-angry"
    assert "handler.py, line 4" in problem["error"]
    assert "the previous code stays in force" in problem["error"]
    await publish_until(client, "angry", "hi", "HI!!!")  # still the old code, no error

    admin.received["status"].clear()
    handler.write_text(good.replace("def handler(", "def handle("))
    problem = await admin.wait_for_match("status", event="function_problem")
    assert "no top-level 'handler'" in problem["error"]
    await publish_until(client, "angry", "hi", "HI!!!")

    for ending in ("?!", "!?"):  # good saves reload, again and again
        handler.write_text(good.replace('"!!!"', f'"{ending}"'))
        await publish_until(client, "angry", "hi", f"HI{ending}")
    reloads = [s for s in admin.received["status"] if s["event"] == "functions_reloaded"]
    assert len(reloads) >= 2 and all(s["functions"] == ["demo-angry"] for s in reloads)
    log = server.log()
    assert "function demo-angry:" in log and "not reloaded: the previous code stays in force" in log
    # reported when the server started: it never had a working version
    assert "function never-worked:" in log and "no working version yet" in log
    # and in the inspector's list of reloads
    async with httpx.AsyncClient() as http:
        reloads = (await http.get(server.url + "/dev/reloads")).json()["reloads"]
    said = {name: text for entry in reloads for name, text in entry["mistakes"].items()}
    assert "line 4" in said["demo-angry"] or "no top-level 'handler'" in said["demo-angry"]
    assert "no working version yet" in said["never-worked"]
    assert any(entry["functions"] == ["demo-angry"] for entry in reloads)


async def test_associations_naming_a_missing_function_are_refused_everywhere(
        server: EchoProcess, clients: list[Client]) -> None:
    admin = await connect(server, admin=True)
    client = await connect(server)
    clients += [admin, client]
    await admin.call("subscribe", {"channels": ["admin"]})
    await client.call("subscribe", {"channels": ["plain"]})
    document = json.loads(json.dumps(TEST_ASSOCIATIONS))
    document["applications"]["test-app"]["channels"][0]["functionNames"] = ["demo-backwards"]
    write_associations(server, document)
    await publish_until(client, "plain", "abc", "cba")

    document["applications"]["test-app"]["channels"][0]["functionNames"] = ["no-such-fn"]
    write_associations(server, document)
    error = await admin.wait_for_match("status", event="associations_error")
    assert "functionNames[0]: no function 'no-such-fn'" in error["error"]
    await publish_until(client, "plain", "abc", "cba")  # the previous document stays

    async with httpx.AsyncClient() as http:
        reply = await http.put(server.url + "/associations", json=document, headers={
            "authorization": "Bearer " + server.management_token()})
    assert reply.status_code == 400
    assert reply.json()["error"]["path"] == "applications.test-app.channels[0].functionNames[0]"
    assert "echoctl functions new no-such-fn" in reply.json()["error"]["message"]

    checked = echoctl("associations", "check", "--project", str(server.project), cwd=server.project)
    assert checked.returncode != 0 and "no function 'no-such-fn'" in checked.stderr
    write_associations(server, TEST_ASSOCIATIONS)


@pytest.mark.unit
def test_channel_names_no_client_may_use_are_refused() -> None:
    def rule(name: str) -> dict[str, object]:
        return {"applications": {"a": {"channels": [{"channelName": name, "functionNames": []}]}}}

    for fine in ("chat", "chat:*", "room-[0-9]", "user:?", "*"):
        parse_associations(rule(fine))
    for bad in ("has space", "émoji", "chat/*!", "x" * 201):
        with pytest.raises(AssociationsError, match="not a channel name clients may use") as err:
            parse_associations(rule(bad))
        assert err.value.path == "applications.a.channels[0].channelName"


@pytest.mark.unit
def test_source_problems_are_found_without_running_the_code(tmp_path: Path) -> None:
    def problem(source: str, handler: str = "handler.handler") -> str | None:
        (tmp_path / "handler.py").write_text(source)
        return source_problem(FunctionSpec(name="f", path=tmp_path, handler=handler))

    assert problem("def handler(message, context):\n    return message\n") is None
    assert problem("async def handler(m, c):\n    return m\n") is None
    assert problem("from impl import run as handler\n") is None
    assert problem("try:\n    import x\nexcept ImportError:\n    def handler(m, c): return m\n") is None
    assert problem("from helpers import *\n") is None  # can't tell: left to the run
    assert problem("raise SystemExit('never run here')\ndef handler(m, c): return m\n") is None
    assert "line 2" in (problem("x = 1\ndef handler(m, c)\n") or "")
    assert "no top-level 'main'" in (problem("def handler(m, c): return m\n", "handler.main") or "")
    assert "no top-level 'handler'" in (problem("def outer():\n    def handler(m, c): pass\n") or "")


@pytest.mark.unit
def test_missing_functions_are_named_by_their_place_in_the_document(tmp_path: Path) -> None:
    (tmp_path / "here").mkdir()
    document = parse_associations({"applications": {"a": {"channels": [
        {"channelName": "c", "functionNames": ["here", "gone"]}]}}})
    assert [p.split(":")[0] for p in missing_functions(document, tmp_path)] == [
        "applications.a.channels[0].functionNames[1]"]

"""A function's own packages: ``functions/NAME/requirements.txt`` is installed for it by
``echoctl dev`` (on save too) and ``functions invoke``, a missing module names the file to add
it to, and the Lambda zip carries the packages. Installs a small pure-Python package
(inflection) from the package index, as a user's pip would."""

from __future__ import annotations

import io
import json
import time
import zipfile
from pathlib import Path

import pytest

from echo.core.functions import load_spec
from echo.packaging import build_zip
from tests.conftest import STARTING_ASSOCIATIONS, TEST_APP, Client, EchoProcess, connect, make_project
from tests.test_cli_and_config import echoctl

pytestmark = pytest.mark.anyio

HANDLER = '''import inflection


def handler(message, context):
    print("slugging", message)
    return inflection.parameterize(message)
'''


def slugger_project(root: Path, *, requirements: bool) -> Path:
    project = make_project(root)
    folder = project / "functions" / "slugger"
    folder.mkdir()
    (folder / "handler.py").write_text(HANDLER)
    if requirements:
        (folder / "requirements.txt").write_text("inflection==0.5.1\n")
    document = json.loads(json.dumps(STARTING_ASSOCIATIONS))
    document["applications"][TEST_APP]["channels"].append(
        {"channelName": "slug", "functionNames": ["slugger"]})
    (project / "associations.json").write_text(json.dumps(document))
    return project


async def test_requirements_are_installed_on_save_and_a_missing_module_names_the_file(
        tmp_path: Path, clients: list[Client]) -> None:
    server = EchoProcess(slugger_project(tmp_path, requirements=False)).start()
    try:
        client = await connect(server)
        clients.append(client)
        await client.call("subscribe", {"channels": ["slug"]})
        refused = await client.call("publish", {"channel": "slug", "message": "Hello World"})
        assert refused["ok"] is False, refused
        message = refused["error"]["message"]
        assert "No module named 'inflection'" in message
        assert "add inflection to" in message and "slugger/requirements.txt" in message

        (server.project / "functions/slugger/requirements.txt").write_text("inflection==0.5.1\n")
        deadline = time.monotonic() + 120
        while True:
            ack = await client.call("publish", {"channel": "slug", "message": "Hello World"})
            if ack["ok"]:
                break
            assert time.monotonic() < deadline, f"never installed: {ack}\n{server.log()[-2000:]}"
            await __import__("asyncio").sleep(0.5)
        got = await client.wait_for_match("message", channel="slug")
        assert got["message"] == "hello-world"
        log = server.log()
        assert "slugger: installing" in log and "requirements installed in" in log
        installed = list((server.project / ".echo/deps").glob("slugger-*/inflection.py"))
        assert len(installed) == 1
    finally:
        server.stop()


def test_invoke_installs_them_and_the_lambda_zip_carries_them(tmp_path: Path) -> None:
    project = slugger_project(tmp_path, requirements=True)
    invoked = echoctl("functions", "invoke", "slugger", "-d", '"Hello World"', cwd=project,
                      timeout=180)
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout) == "hello-world"
    package = build_zip(load_spec(project / "functions" / "slugger"))
    names = zipfile.ZipFile(io.BytesIO(package.data)).namelist()
    assert "handler.py" in names and "inflection.py" in names

    (project / "functions/slugger/requirements.txt").write_text("no-such-package-echo-test==9.9\n")
    broken = echoctl("functions", "invoke", "slugger", "-d", '"x"', cwd=project, timeout=180)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert "pip could not install" in broken.stderr

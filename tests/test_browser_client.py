"""Plumbing around the browser client and the demo apps, without a browser:

- `/dev/token` (how the demo pages get a token without copy-paste) exists under
  `echoctl dev` only; `echoctl serve` answers 404 there and serves no apps, yet serves
  the client itself (`/client/echo.js`).
- The client as a bundler sees it: `import { Echo } from "echo-browser-client"` resolves
  through echo/client/package.json, and echo.js's `./socket.io.esm.min.js` resolves to the
  small file beside it that imports `socket.io-client` by its bare name. Node resolves
  modules the way bundlers do, so Node runs that path against a live server: subscribe,
  publish, the ack promise, a refusal as a rejected EchoError, stop().
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from echo.core.auth import verify_token
from tests.conftest import REPO, SECRET, EchoProcess, make_project

CLIENT_DIR = REPO / "echo" / "client"


def _cannot_run(reason: str) -> NoReturn:
    """Skip loudly without Node or the client's npm packages; on CI (CI=true) fail."""
    message = f"CLIENT MODULE TEST NOT RUN: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def serve_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    server = EchoProcess(make_project(tmp_path_factory.mktemp("serve")), command="serve").start()
    yield server
    server.stop()


def test_serve_has_no_dev_token_route_and_no_apps(serve_server: EchoProcess) -> None:
    for path in ("/dev/token?app=chat-demo", "/dev/token?app=chat-demo&admin=1",
                 "/apps/chat-demo/", "/apps/admin/"):
        reply = httpx.get(serve_server.url + path, timeout=5)
        assert reply.status_code == 404, (path, reply.status_code, reply.text[:200])
    client = httpx.get(serve_server.url + "/client/echo.js", timeout=5)
    assert client.status_code == 200 and "export class Echo" in client.text


def test_dev_token_route_gives_user_and_admin_tokens(echo_server: EchoProcess) -> None:
    user = httpx.get(echo_server.url + "/dev/token", params={"app": "live-map"}, timeout=5)
    assert user.status_code == 200
    body = user.json()
    assert body["appName"] == "live-map" and body["admin"] is False
    claims = verify_token(SECRET, body["jwt"], app="live-map")
    assert claims.app == "live-map" and claims.admin is False

    admin = httpx.get(echo_server.url + "/dev/token?app=live-map&admin=1", timeout=5).json()
    assert admin["admin"] is True and verify_token(SECRET, admin["jwt"], app="live-map").admin

    for query in ("", "?app=", "?app=not%20a%20name"):
        reply = httpx.get(echo_server.url + "/dev/token" + query, timeout=5)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "bad_request"


NODE_SCRIPT = """
import { Echo, EchoError } from "echo-browser-client";

setTimeout(() => { console.error("no result within 10 s"); process.exit(2); }, 10000).unref();
const [url, jwt] = process.argv.slice(2);
const echo = new Echo({ host: url, appName: "chat-demo", jwt, uuid: "bundled-1" });
const states = [];
const received = new Promise((resolve) =>
  echo.addListener({ message: resolve, state: ({ state }) => states.push(state) }));
const subscribed = await echo.subscribe({ channels: ["angry"] });
const ack = await echo.publish({ channel: "angry", message: { text: "bundled" } });
const message = await received;
let refused = null;
try {
  await echo.publish({ channel: "no spaces allowed", message: "x" });
} catch (err) {
  refused = { isEchoError: err instanceof EchoError, code: err.code, message: err.message };
}
echo.stop();
console.log(JSON.stringify({ subscribed, ack, message, refused, states, state: echo.state }));
process.exit(0);
"""


@pytest.fixture
def installed_client(tmp_path: Path) -> Path:
    """A folder with an app that installed the client: node_modules/echo-browser-client holds
    what npm would put there (package.json "files"), beside socket.io-client and its
    dependencies."""
    if shutil.which("node") is None:
        _cannot_run("node is not installed")
    if not (CLIENT_DIR / "node_modules" / "socket.io-client").is_dir():
        _cannot_run("the browser client's npm packages are missing; run "
                    "`npm ci --prefix echo/client`")
    modules = tmp_path / "node_modules"
    modules.mkdir()
    for dependency in (CLIENT_DIR / "node_modules").iterdir():
        if not dependency.name.startswith("."):
            (modules / dependency.name).symlink_to(dependency, target_is_directory=True)
    package = json.loads((CLIENT_DIR / "package.json").read_text())
    assert package["exports"]["."] == "./echo.js"
    installed = modules / package["name"]
    installed.mkdir()
    for name in ("package.json", *package["files"]):
        shutil.copy(CLIENT_DIR / name, installed / name)
    return tmp_path


def run_node(folder: Path, script: str, *args: str) -> dict[str, Any]:
    """Run ``script`` as an ES module in ``folder``; its last line of output is JSON."""
    (folder / "app.mjs").write_text(script)
    run = subprocess.run([str(shutil.which("node")), "app.mjs", *args], cwd=folder,
                         capture_output=True, text=True, timeout=25)
    assert run.returncode == 0, f"node failed:\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_client_resolves_socket_io_by_bare_name_like_a_bundler(
    echo_server: EchoProcess, installed_client: Path
) -> None:
    result = run_node(installed_client, NODE_SCRIPT, echo_server.url,
                      echo_server.token("chat-demo"))
    assert result["subscribed"] == {"ok": True, "channels": ["angry"]}
    assert result["ack"]["ok"] is True and result["ack"]["delivered"] is True
    assert result["message"]["message"] == {"text": "BUNDLED!!!"}
    assert result["message"]["uuid"] == "bundled-1"
    assert result["message"]["id"] == result["ack"]["id"]
    assert result["refused"]["isEchoError"] is True
    assert result["refused"]["code"] == "bad_channel", result["refused"]
    assert result["states"][:2] == ["connecting", "connected"]
    assert result["state"] == "disconnected"


RETRY_SCRIPT = """
import { Echo } from "echo-browser-client";

setTimeout(() => { console.error("no result within 15 s"); process.exit(2); }, 15000).unref();
const [url, jwt] = process.argv.slice(2);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const reaches = (echo, wanted) => new Promise((resolve) =>
  echo.addListener({ state: (s) => { if (s.state === wanted) resolve(s); } }));

// the server takes one connection for this app: the second is refused, then let in
const first = new Echo({ host: url, appName: "chat-demo", jwt, uuid: "first" });
await reaches(first, "connected");
const second = new Echo({ host: url, appName: "chat-demo", jwt, uuid: "second" });
const states = [];
second.addListener({ state: ({ state }) => states.push(state) });
const refusal = await reaches(second, "error");
first.stop();
await reaches(second, "connected");
const subscribed = await second.subscribe({ channels: ["boring"] });
second.stop();

// a bad token is refused for good: no retries
const bad = new Echo({ host: url, appName: "chat-demo", jwt: jwt + "x", uuid: "bad" });
const badStates = [];
bad.addListener({ state: (s) => badStates.push(s) });
await sleep(1500); // a retry would come within 0.75 s
bad.stop();
console.log(JSON.stringify({ refusal, states, subscribed, badStates }));
process.exit(0);
"""


def test_client_retries_a_refused_connection_unless_the_token_is_bad(
    tmp_path_factory: pytest.TempPathFactory, installed_client: Path
) -> None:
    project = make_project(tmp_path_factory.mktemp("limited"))
    server = EchoProcess(project, env={"ECHO_MAX_CONNECTIONS_PER_APP": "1"}).start()
    try:
        result = run_node(installed_client, RETRY_SCRIPT, server.url, server.token("chat-demo"))
    finally:
        server.stop()
    assert result["refusal"]["retrying"] is True, result
    assert result["refusal"]["message"].startswith("limit"), result
    # refused, tried again by itself, in; then stopped
    assert result["states"] == ["connecting", "error", "connecting", "connected",
                                "disconnected"], result["states"]
    assert result["subscribed"] == {"ok": True, "channels": ["boring"]}
    bad = [s for s in result["badStates"] if s["state"] != "disconnected"]
    assert [s["state"] for s in bad] == ["connecting", "error"], result["badStates"]
    assert bad[1]["retrying"] is False
    assert bad[1]["message"].startswith("Authorization error"), bad


TOKEN_SCRIPT = """
import { Echo } from "echo-browser-client";

setTimeout(() => { console.error("no result within 15 s"); process.exit(2); }, 15000).unref();
const [url, expired, fresh] = process.argv.slice(2);
let asked = 0;
// the first token has expired: getToken is asked again on the retry and gets a good one
const echo = new Echo({ host: url, appName: "test-app", getToken: async () => (asked++ ? fresh : expired) });
const connected = new Promise((resolve) =>
  echo.addListener({ state: (s) => { if (s.state === "connected") resolve(s); } }));
await connected;
const personal = await echo.subscribe({ channels: ["user:ada"] });
const here = await echo.socket.timeout(5000).emitWithAck("presence", { channel: "user:ada" });
echo.stop();
console.log(JSON.stringify({ asked, uuid: echo.uuid, personal, here }));
process.exit(0);
"""


def test_client_asks_get_token_on_each_connect_and_takes_the_tokens_user(
    echo_server: EchoProcess, installed_client: Path
) -> None:
    expired = echo_server.token("test-app", uuid="ada", ttl=-60)
    result = run_node(installed_client, TOKEN_SCRIPT, echo_server.url, expired,
                      echo_server.token("test-app", uuid="ada"))
    assert result["asked"] >= 2 and result["uuid"] == "ada"
    assert result["personal"]["ok"] is True
    assert result["here"]["count"] == 1 and result["here"]["clients"] == [{"uuid": "ada"}]

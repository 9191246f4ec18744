"""The README's backend example (apps/backend/app.py), run as written under uvicorn beside a
real ``echoctl dev`` that sends it webhooks: the token it mints names the user, its publish
reaches that user's personal channel, it reads presence, and it takes signed webhooks and
refuses forged ones. Also the SDK pieces it leans on: every server API route, a token
minted from the secret, webhook verification."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import httpx
import pytest
import uvicorn

from echo.core.webhooks import signature
from echo.sdk import EchoError, ServerApi, verify_webhook
from tests.conftest import REPO, SECRET, TEST_APP, EchoProcess, connect, free_port, make_project

pytestmark = pytest.mark.anyio

HOOK_SECRET = "example-webhook-secret-0123456789abcdef"


class Backend:
    """The example app in uvicorn on a thread, on loopback."""

    def __init__(self, module: ModuleType, port: int) -> None:
        self.module = module
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(module.app, host="127.0.0.1", port=port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> Backend:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "the example backend did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def example(monkeypatch: pytest.MonkeyPatch,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EchoProcess, Backend]]:
    backend_port = free_port()
    hooks = {TEST_APP: [{"url": f"http://127.0.0.1:{backend_port}/echo-hooks",
                         "events": ["connection", "subscribe"], "secret": HOOK_SECRET}]}
    echo = EchoProcess(make_project(tmp_path_factory.mktemp("backend-example")),
                       env={"ECHO_WEBHOOKS": json.dumps(hooks)}).start()
    for name, value in (("ECHO_URL", echo.url), ("ECHO_SECRET", SECRET), ("ECHO_APP", TEST_APP),
                        ("ECHO_WEBHOOK_SECRET", HOOK_SECRET)):
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("backend_example", REPO / "apps/backend/app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    backend = Backend(module, backend_port).start()
    yield echo, backend
    backend.stop()
    echo.stop()


async def eventually(condition: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


async def test_the_readme_backend_mints_publishes_reads_presence_and_takes_webhooks(
        example: tuple[EchoProcess, Backend], http: httpx.AsyncClient) -> None:
    echo, backend = example
    jwt = (await http.get(f"{backend.url}/token", params={"user": "ada"})).json()["jwt"]
    ada = await connect(echo, token=jwt)  # no uuid sent: the token's is hers
    try:
        assert (await ada.call("subscribe", {"channels": ["user:ada", "support"]}))["ok"]
        shipped = await http.post(f"{backend.url}/ship", json={"user": "ada", "id": 17})
        assert shipped.json() == {"delivered": True, "support_online": 1}
        again = await http.post(f"{backend.url}/ship", json={"user": "ada", "id": 17})
        assert again.status_code == 200  # the retry is answered, not delivered twice
        await eventually(lambda: len(ada.messages) >= 1)
        await asyncio.sleep(0.3)
        assert [(m["channel"], m["message"]) for m in ada.messages] == [("user:ada", {"shipped": 17})]

        # the webhooks came in signed and were taken: ada's connection and her subscribe
        events = backend.module.events
        await eventually(lambda: {e["event"] for e in events} >= {"connection", "subscribe"})
        assert all(e.get("uuid") == "ada" for e in events)

        body = json.dumps({"id": "x", "app": TEST_APP, "events": [{"event": "forged"}]}).encode()
        stamp = str(int(time.time()))
        forged = await http.post(f"{backend.url}/echo-hooks", content=body, headers={
            "echo-webhook-timestamp": stamp,
            "echo-webhook-signature": signature("not-the-secret-0123456789abcdef", stamp, body)})
        assert forged.status_code == 400 and "signature does not match" in forged.json()["error"]
        assert all(e["event"] != "forged" for e in events)
    finally:
        await ada.sio.disconnect()


@pytest.mark.unit
def test_the_readme_shows_the_example_as_it_is() -> None:
    readme = (REPO / "README.md").read_text()
    shown = readme.split("## From your backend", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    source = {line.split("  #")[0].rstrip()
              for line in (REPO / "apps/backend/app.py").read_text().splitlines()}
    missing = [line for line in shown.splitlines()
               if line.strip() and line.split("  #")[0].rstrip() not in source
               and not line.lstrip().startswith("async def ")]
    assert not missing, f"README lines not in apps/backend/app.py: {missing}"


@pytest.mark.unit
def test_verify_webhook_names_what_is_wrong() -> None:
    body = b'{"id": "b1", "app": "a", "events": []}'
    now = str(int(time.time()))
    good = {"echo-webhook-timestamp": now, "echo-webhook-signature": signature(HOOK_SECRET, now, body)}
    assert verify_webhook(HOOK_SECRET, good, body)["id"] == "b1"
    old = str(int(time.time()) - 3600)
    cases = {
        "header missing": {},
        "not unix seconds": {**good, "echo-webhook-timestamp": "yesterday"},
        "does not match": {**good, "echo-webhook-signature": "v1=00"},
        "a replay": {"echo-webhook-timestamp": old,
                     "echo-webhook-signature": signature(HOOK_SECRET, old, body)},
    }
    for expected, headers in cases.items():
        with pytest.raises(EchoError) as refused:
            verify_webhook(HOOK_SECRET, headers, body)
        assert refused.value.code == "bad_signature" and expected in refused.value.message
    with pytest.raises(EchoError, match="does not match"):
        verify_webhook(HOOK_SECRET, good, body + b" ")  # one byte changed after signing
    for hostile in ({**good, "echo-webhook-timestamp": "9" * 400},
                    {**good, "echo-webhook-signature": "v1=\u00e9"}):
        with pytest.raises(EchoError):  # never another exception (a 500 in a receiver)
            verify_webhook(HOOK_SECRET, hostile, body)


@pytest.mark.unit
def test_the_sdk_renews_a_token_it_mints_and_names_an_unreachable_server() -> None:
    from echo.core.auth import verify_token
    from echo.sdk.server_api import BearerToken

    minted = BearerToken(TEST_APP, None, SECRET)
    first = minted.current()
    assert verify_token(SECRET, first, app=TEST_APP).admin and minted.current() == first
    minted.expires = time.time() + 30  # inside the renewal window: minted again
    renewed = minted.current()
    assert verify_token(SECRET, renewed, app=TEST_APP).admin and minted.expires > time.time() + 3000
    with ServerApi(f"http://127.0.0.1:{free_port()}", TEST_APP, secret=SECRET) as api:
        with pytest.raises(EchoError) as refused:
            api.presence("plain")
    assert refused.value.code == "unreachable"


async def test_every_server_api_route_through_the_sdk_with_a_token_minted_from_the_secret(
        echo_server: EchoProcess) -> None:
    tab1 = await connect(echo_server, token=echo_server.token(uuid="grace"))
    tab2 = await connect(echo_server, token=echo_server.token(uuid="grace"))
    try:
        for tab in (tab1, tab2):
            assert (await tab.call("subscribe", {"channels": ["room:sdk", "room:sdk-other"]}))["ok"]
        with ServerApi(echo_server.url, TEST_APP, secret=SECRET) as api:
            assert api.presence("room:sdk")["count"] == 2
            listed = {c["channel"]: c["count"] for c in api.channels()["channels"]}
            assert listed["room:sdk"] == 2 and listed["room:sdk-other"] == 2
            assert api.unsubscribe("grace", "room:sdk") == {"ok": True, "uuid": "grace",
                                                           "channel": "room:sdk"}
            await eventually(lambda: api.presence("room:sdk")["count"] == 0)
            assert api.presence("room:sdk-other")["count"] == 2
            assert api.disconnect("grace")["ok"]
            await eventually(lambda: not tab1.sio.connected and not tab2.sio.connected)
            await eventually(lambda: api.presence("room:sdk-other")["count"] == 0)
        with pytest.raises(ValueError, match="not both"):
            ServerApi(echo_server.url, TEST_APP, "a-token", secret=SECRET)
    finally:
        for tab in (tab1, tab2):
            if tab.sio.connected:
                await tab.sio.disconnect()

"""The HTTP server API (``/api/{app}/...``): an app's backend publishes, broadcasts and reads
presence and history over HTTP, against a real ``echoctl dev`` and, for presence across
nodes, two ``echoctl serve`` nodes on a private Redis; subscribers are real Socket.IO clients.
The OpenAPI document is checked with openapi-spec-validator and the answers against it.
"""

from __future__ import annotations

import asyncio
import uuid as uuids
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from tests.conftest import TEST_APP, Client, EchoProcess, RedisServer, connect, make_project

pytestmark = pytest.mark.anyio


def api(server: EchoProcess, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=f"{server.url}/api/{TEST_APP}", headers=headers,
                             trust_env=False, timeout=10)


def admin(server: EchoProcess) -> httpx.AsyncClient:
    return api(server, server.token(admin=True))


async def schema_of(server: EchoProcess, name: str) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as http:
        spec = (await http.get(server.url + "/api/openapi.json")).json()
    return {**spec["components"]["schemas"][name], "components": spec["components"]}


async def test_the_openapi_document_is_valid(echo_server: EchoProcess) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        reply = await http.get(echo_server.url + "/api/openapi.json")
    assert reply.status_code == 200
    spec = reply.json()
    validate(spec)  # raises on an invalid OpenAPI 3.1 document
    assert {"/api/{app}/publish", "/api/{app}/broadcast", "/api/{app}/presence",
            "/api/{app}/history"} <= set(spec["paths"])


async def test_only_the_apps_admin_or_a_management_token_may_call_it(echo_server: EchoProcess) -> None:
    body = {"channel": "plain", "message": "hi"}
    cases = [
        (None, 401, "unauthorized"),
        ("not-a-jwt", 401, "unauthorized"),
        (echo_server.token(), 403, "forbidden"),                      # a user token
        (echo_server.token("chat-demo", admin=True), 401, "unauthorized"),  # another app's
    ]
    for token, status, code in cases:
        async with api(echo_server, token) as http:
            reply = await http.post("/publish", json=body)
        assert (reply.status_code, reply.json()["error"]["code"]) == (status, code), token
        assert reply.json()["ok"] is False
    for token in (echo_server.token(admin=True), echo_server.management_token()):
        async with api(echo_server, token) as http:
            assert (await http.post("/publish", json=body)).json()["ok"] is True


ROUTES = [("POST", "/publish"), ("POST", "/broadcast"), ("GET", "/presence?channel=plain"),
          ("GET", "/channels"), ("GET", "/history?channel=hist:x"), ("POST", "/disconnect"),
          ("POST", "/unsubscribe")]


async def test_every_route_refuses_wrong_tokens_bad_json_and_oversize_bodies(
        echo_server: EchoProcess) -> None:
    for token, status in ((echo_server.token(), 403), (echo_server.token("chat-demo", admin=True), 401),
                          (None, 401)):
        async with api(echo_server, token) as http:
            for method, path in ROUTES:
                reply = await http.request(method, path, json={})
                assert reply.status_code == status, (method, path, token)
                assert reply.json()["ok"] is False
    async with admin(echo_server) as http:
        for method, path in ROUTES:
            if method != "POST":
                continue
            broken = await http.post(path, content=b"{nope")
            assert broken.status_code == 400 and broken.json()["error"]["code"] == "bad_request"
            huge = await http.post(path, content=b"[" + b"1," * 600_000 + b"1]")
            assert huge.status_code == 413 and huge.json()["error"]["code"] == "too_large"
            wrong = await http.post(path, json=["not", "an", "object"])
            assert wrong.status_code == 400
            # strict JSON, as on the socket: never a 500, never a NaN passed on to webhooks
            for body in (b'{"channel": "plain", "message": ' + b"[" * 100_000 + b"]" * 100_000
                         + b"}", b'{"channel": "plain", "message": NaN}'):
                odd = await http.post(path, content=body)
                assert odd.status_code == 400, (path, odd.text[:200])
        newline = await http.post("/publish", json={"channel": "plain\n", "message": 1})
        assert newline.status_code == 400 and newline.json()["error"]["code"] == "bad_channel"
    limited = echo_server.token(admin=True, capabilities={"news": ["subscribe"]})
    async with api(echo_server, limited) as http:  # an admin token held to its capabilities
        refused = await http.post("/publish", json={"channel": "plain", "message": 1})
        assert refused.status_code == 403 and "may not publish" in refused.json()["error"]["message"]
        assert (await http.get("/presence", params={"channel": "plain"})).status_code == 403


async def test_a_backend_publish_runs_the_functions_and_reaches_subscribers(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    sub = await connect(echo_server)
    clients.append(sub)
    await sub.call("subscribe", {"channels": ["angry", "filtered"]})
    published = await schema_of(echo_server, "Published")
    async with admin(echo_server) as http:
        reply = await http.post("/publish", json={"channel": "angry", "message": {"text": "calm"},
                                                  "uuid": "order-service"})
        assert reply.status_code == 200
        ack = reply.json()
        jsonschema.validate(ack, published)
        assert ack["delivered"] is True
        filtered = (await http.post("/publish", json={"channel": "filtered",
                                                      "message": {"text": "LOUD!!"}})).json()
        jsonschema.validate(filtered, published)
        assert filtered["delivered"] is False and filtered["filteredBy"]
        bad = await http.post("/publish", json={"channel": "no spaces", "message": 1})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_channel"
        broken = await http.post("/publish", content=b"{not json")
        assert broken.status_code == 400 and "JSON" in broken.json()["error"]["message"]
    got = await sub.wait_for("message")
    assert got[0]["message"] == {"text": "CALM!!!"} and got[0]["uuid"] == "order-service"
    assert got[0]["id"] == ack["id"]
    await asyncio.sleep(0.2)
    assert len(sub.messages) == 1


async def test_broadcast_publishes_on_every_channel_or_on_none(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    sub = await connect(echo_server)
    clients.append(sub)
    await sub.call("subscribe", {"channels": ["plain", "room:a"]})
    async with admin(echo_server) as http:
        refused = await http.post("/broadcast", json={"channels": ["plain", "bad name"],
                                                      "message": "x"})
        assert refused.status_code == 400
        reply = (await http.post("/broadcast", json={"channels": ["plain", "room:a"],
                                                     "message": "hello"})).json()
    assert reply["ok"] and set(reply["results"]) == {"plain", "room:a"}
    assert all(r["ok"] for r in reply["results"].values())
    got = await sub.wait_for("message", 2)
    assert sorted((m["channel"], m["message"]) for m in got) == [("plain", "hello"),
                                                                  ("room:a", "olleh")]


async def test_a_backend_is_not_held_to_the_browser_rate_limit(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    async with admin(echo_server) as http:
        replies = await asyncio.gather(*(http.post("/publish", json={"channel": "plain",
                                                                    "message": i})
                                         for i in range(300)))
    assert [r.status_code for r in replies] == [200] * 300  # the browser limit is 100 at once
    backend = await connect(echo_server, admin=True)
    clients.append(backend)
    acks = await asyncio.gather(*(backend.call("publish", {"channel": "plain", "message": i})
                                  for i in range(300)))
    assert all(a["ok"] for a in acks)


async def test_history_over_http_says_whether_nothing_is_missing(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = "hist:" + uuids.uuid4().hex[:8]
    async with admin(echo_server) as http:
        acks = [(await http.post("/publish", json={"channel": channel, "message": n})).json()
                for n in range(5)]
        epoch = acks[0]["epoch"]
        read = (await http.get("/history", params={"channel": channel, "since": 2,
                                                   "epoch": epoch})).json()
        assert [p["message"] for p in read["publications"]] == [2, 3, 4]
        assert read["recovered"] is True and read["offset"] == 5
        wrong = (await http.get("/history", params={"channel": channel, "since": 2,
                                                    "epoch": "another"})).json()
        assert wrong["recovered"] is False
        cut = (await http.get("/history", params={"channel": channel, "since": 0, "limit": 2,
                                                  "epoch": epoch})).json()
        assert len(cut["publications"]) == 2 and cut["recovered"] is False  # not all of them
        newest = (await http.get("/history", params={"channel": channel, "limit": 2,
                                                     "reverse": "true"})).json()
        assert [p["offset"] for p in newest["publications"]] == [5, 4]
        plain = await http.get("/history", params={"channel": "plain"})
        assert plain.status_code == 400 and "keeps no history" in plain.json()["error"]["message"]
        bad = await http.get("/history", params={"channel": channel, "limit": "many"})
        assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]


async def test_presence_lists_who_is_subscribed_now(echo_server: EchoProcess,
                                                    clients: list[Client]) -> None:
    channel = "room:" + uuids.uuid4().hex[:8]
    for name in ("ada", "bob"):
        client = await connect(echo_server, uuid=name)
        clients.append(client)
        await client.call("subscribe", {"channels": [channel]})
    async with admin(echo_server) as http:
        reply = (await http.get("/presence", params={"channel": channel})).json()
        empty = (await http.get("/presence", params={"channel": channel + "-none"})).json()
    assert reply["count"] == 2 and [c["uuid"] for c in reply["clients"]] == ["ada", "bob"]
    assert empty == {"ok": True, "channel": channel + "-none", "count": 0, "clients": []}
    async with admin(echo_server) as http:
        listed = (await http.get("/channels")).json()["channels"]
    assert {"channel": channel, "count": 2} in listed


async def test_the_backend_disconnects_or_unsubscribes_a_user(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    user = "kick-" + uuids.uuid4().hex[:6]
    first = await connect(echo_server, token=echo_server.token(uuid=user))
    second = await connect(echo_server, token=echo_server.token(uuid=user))
    bystander = await connect(echo_server)
    clients.extend([first, second, bystander])
    for client in (first, second, bystander):
        await client.call("subscribe", {"channels": ["plain", "room:z"]})
    async with admin(echo_server) as http:
        reply = (await http.post("/unsubscribe", json={"uuid": user, "channel": "room:z"})).json()
        assert reply == {"ok": True, "uuid": user, "channel": "room:z"}
        for client in (first, second):
            assert (await client.wait_for("unsubscribed"))[0] == {"channel": "room:z",
                                                                  "reason": "server"}
        await http.post("/publish", json={"channel": "room:z", "message": "after"})
        await bystander.wait_for("message")
        assert first.messages == [] and second.messages == []
        bad = await http.post("/disconnect", json={"uuid": ""})
        assert bad.status_code == 400
        assert (await http.post("/disconnect", json={"uuid": user})).json()["ok"]
    await wait_disconnected(first, second)
    assert bystander.sio.connected
    async with httpx.AsyncClient(trust_env=False) as http:
        spec_paths = (await http.get(echo_server.url + "/api/openapi.json")).json()["paths"]
    assert {"/api/{app}/disconnect", "/api/{app}/unsubscribe"} <= set(spec_paths)


async def wait_disconnected(*clients: Client) -> None:
    for _ in range(100):
        if not any(c.sio.namespaces for c in clients):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("still connected")


async def test_presence_on_the_socket(echo_server: EchoProcess, clients: list[Client]) -> None:
    channel = "room:" + uuids.uuid4().hex[:8]
    ada = await connect(echo_server, uuid="ada")
    clients.append(ada)
    await ada.call("subscribe", {"channels": [channel]})
    here = await ada.call("presence", {"channel": channel})
    assert here == {"ok": True, "channel": channel, "count": 1, "clients": [{"uuid": "ada"}]}
    limited = await connect(echo_server, token=echo_server.token(
        capabilities={"room:*": ["subscribe"]}))
    clients.append(limited)
    refused = await limited.call("presence", {"channel": channel})
    assert refused["error"]["code"] == "forbidden"


async def test_a_counts_only_channel_sends_no_joins_and_answers_a_count(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    watcher = await connect(echo_server)
    clients.append(watcher)
    await watcher.call("subscribe", {"channels": ["crowd", "plain"], "withPresence": True})
    for name in ("a", "b", "c"):
        member = await connect(echo_server, uuid=name)
        clients.append(member)
        await member.call("subscribe", {"channels": ["crowd", "plain"], "withPresence": True})
    await watcher.wait_for("presence", 3)  # the joins on "plain", none on "crowd"
    await asyncio.sleep(0.3)
    assert {p["channel"] for p in watcher.received["presence"]} == {"plain"}
    here = await watcher.call("presence", {"channel": "crowd"})
    assert here == {"ok": True, "channel": "crowd", "count": 4}


@pytest.fixture
async def nodes(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[list[EchoProcess]]:
    project = make_project(tmp_path)
    started = [EchoProcess(project, env={"ECHO_REDIS_URL": redis_server.url}, command="serve").start()
               for _ in range(2)]
    yield started
    for server in started:
        server.stop()


@pytest.mark.redis
async def test_presence_and_publish_across_nodes(nodes: list[EchoProcess],
                                                 clients: list[Client]) -> None:
    channel = "room:" + uuids.uuid4().hex[:8]
    sub = await connect(nodes[0], uuid="on-node-a")
    other = await connect(nodes[1], uuid="on-node-b")
    clients.extend([sub, other])
    await sub.call("subscribe", {"channels": [channel]})
    await other.call("subscribe", {"channels": [channel]})
    async with admin(nodes[1]) as http:
        for _ in range(50):  # presence writes reach Redis through a queue: shortly
            reply = (await http.get("/presence", params={"channel": channel})).json()
            if reply["count"] == 2:
                break
            await asyncio.sleep(0.1)
        assert [c["uuid"] for c in reply["clients"]] == ["on-node-a", "on-node-b"]
        listed = (await http.get("/channels")).json()["channels"]
        assert {"channel": channel, "count": 2} in listed
        ack = (await http.post("/publish", json={"channel": channel, "message": "hi"})).json()
    assert ack["ok"]
    for client in (sub, other):  # on both nodes, through room:*'s function (demo-backwards)
        assert (await client.wait_for("message"))[0]["message"] == "ih"
    async with admin(nodes[1]) as http:  # an order to another node's connection
        assert (await http.post("/disconnect", json={"uuid": "on-node-a"})).json()["ok"]
    await wait_disconnected(sub)


@pytest.mark.redis
async def test_presence_drops_a_sigkilled_nodes_clients_within_its_liveness(
        tmp_path: Path, redis_server: RedisServer, clients: list[Client]) -> None:
    liveness = 3.0
    project = make_project(tmp_path)
    survivor, doomed = (EchoProcess(project, command="serve", env={
        "ECHO_REDIS_URL": redis_server.url, "ECHO_NODE_LIVENESS": str(liveness)}).start()
        for _ in range(2))
    try:
        channel = "room:" + uuids.uuid4().hex[:8]
        stays = await connect(survivor, uuid="stays")
        ghost = await connect(doomed, uuid="would-be-ghost")
        clients.append(stays)
        for client in (stays, ghost):
            await client.call("subscribe", {"channels": [channel]})
        async with admin(survivor) as http:
            async def here() -> list[str]:
                reply = (await http.get("/presence", params={"channel": channel})).json()
                return [c["uuid"] for c in reply["clients"]]

            for _ in range(50):  # presence writes reach Redis through a queue: shortly
                if await here() == ["stays", "would-be-ghost"]:
                    break
                await asyncio.sleep(0.1)
            assert await here() == ["stays", "would-be-ghost"]
            doomed.kill()  # SIGKILL: no goodbye, no presence_remove
            killed = asyncio.get_running_loop().time()
            while "would-be-ghost" in await here():
                assert asyncio.get_running_loop().time() - killed < liveness + 3, (
                    "a dead node's client is still listed past its liveness")
                await asyncio.sleep(0.2)
            assert await here() == ["stays"]
            listed = (await http.get("/channels")).json()["channels"]
            assert {"channel": channel, "count": 1} in listed
    finally:
        survivor.stop()
        doomed.kill()


# --- user identity and personal channels -------------------------------------------------


async def test_a_token_with_a_uuid_fixes_who_the_connection_is(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    from tests.test_bad_input import refused

    reason = await refused(echo_server, TEST_APP, {"jwt": echo_server.token(uuid="ada"),
                                                   "uuid": "mallory"})
    assert "does not match the token" in reason
    ada = await connect(echo_server, token=echo_server.token(uuid="ada"))  # no uuid sent
    clients.append(ada)
    await ada.call("subscribe", {"channels": ["plain"]})
    await ada.call("publish", {"channel": "plain", "message": "me"})
    got = await ada.wait_for("message")
    assert got[0]["uuid"] == "ada"


async def test_a_personal_channel_opens_only_to_its_user_and_reaches_all_their_connections(
        echo_server: EchoProcess, clients: list[Client]) -> None:
    user = "u-" + uuids.uuid4().hex[:8]
    phone = await connect(echo_server, token=echo_server.token(uuid=user))
    laptop = await connect(echo_server, token=echo_server.token(uuid=user), uuid=user)
    other = await connect(echo_server, token=echo_server.token(uuid="someone-else"))
    anonymous = await connect(echo_server)
    clients.extend([phone, laptop, other, anonymous])
    for mine in (phone, laptop):
        assert (await mine.call("subscribe", {"channels": [f"user:{user}"]}))["ok"]
    for stranger in (other, anonymous):
        refusal = await stranger.call("subscribe", {"channels": [f"user:{user}"]})
        assert refusal["error"]["code"] == "forbidden" and "personal" in refusal["error"]["message"]
        assert (await stranger.call("history", {"channel": f"user:{user}"}))["error"]["code"] \
            == "forbidden"
    async with admin(echo_server) as http:
        ack = (await http.post("/publish", json={"channel": f"user:{user}",
                                                 "message": "your order shipped"})).json()
    assert ack["ok"]
    for mine in (phone, laptop):
        assert (await mine.wait_for("message"))[0]["message"] == "your order shipped"


def test_echoctl_jwt_mints_a_user_token_with_a_uuid(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    from echo.core.auth import verify_token
    from tests.conftest import SECRET

    project = make_project(tmp_path)
    out = subprocess.run([sys.executable, "-m", "echo", "jwt", TEST_APP, "--uuid", "ada", "--json",
                          "--project", str(project)], capture_output=True, text=True, check=True,
                         env={**os.environ, "ECHO_SECRET": SECRET})
    token = json.loads(out.stdout)["jwt"]
    assert verify_token(SECRET, token, app=TEST_APP).user == "ada"

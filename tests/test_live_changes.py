"""Changing functions and associations while clients stay connected: file edits and HTTP PUT."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from tests.conftest import TEST_ASSOCIATIONS, Client, EchoProcess, connect

pytestmark = pytest.mark.anyio


async def publish_until(client: Client, channel: str, text: str, expected: Any,
                        timeout: float = 5) -> float:
    """Publish repeatedly until the delivered message equals ``expected``; return the wait."""
    started = time.monotonic()
    while True:
        before = len(client.messages)
        ack = await client.call("publish", {"channel": channel, "message": text})
        if ack.get("delivered"):
            await client.wait_for("message", before + 1)
            if client.messages[-1]["message"] == expected:
                return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"never got {expected!r}; last: {client.messages[-1:]}, {ack}")
        await asyncio.sleep(0.05)


def write_associations(server: EchoProcess, document: dict[str, Any] | str) -> None:
    text = document if isinstance(document, str) else json.dumps(document, indent=2)
    (server.project / "associations.json").write_text(text)


async def test_editing_a_function_applies_to_the_next_message(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server, "chat-demo")
    clients.append(client)
    await client.call("subscribe", {"channels": ["angry"]})
    await publish_until(client, "angry", "hi", "HI!!!")
    handler = echo_server.project / "functions" / "demo-angry" / "handler.py"
    handler.write_text(handler.read_text().replace('"!!!"', '"?!"'))
    waited = await publish_until(client, "angry", "hi", "HI?!")
    assert waited < 5
    assert client.sio.connected, "hot reload must not drop connections"


async def test_editing_associations_file_applies_live_and_broken_file_keeps_last_good(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    client = await connect(echo_server)
    admin = await connect(echo_server, admin=True)
    clients += [client, admin]
    await client.call("subscribe", {"channels": ["plain"]})
    await publish_until(client, "plain", "abc", "abc")

    document = json.loads(json.dumps(TEST_ASSOCIATIONS))
    document["applications"]["test-app"]["channels"][0]["functionNames"] = ["demo-backwards"]
    write_associations(echo_server, document)
    await publish_until(client, "plain", "abc", "cba")

    write_associations(echo_server, '{"applications": {"test-app": {"channels": [')
    error = await admin.wait_for_match("status", event="associations_error")
    assert "not valid JSON" in error["error"] and "line 1" in error["error"]
    # the last good document is still in force
    await publish_until(client, "plain", "abc", "cba")
    write_associations(echo_server, TEST_ASSOCIATIONS)
    await publish_until(client, "plain", "abc", "abc")


async def test_put_associations_needs_a_management_token_and_validates(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    url = echo_server.url + "/associations"
    admin_headers = {"authorization": "Bearer " + echo_server.management_token()}
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).status_code == 401
        for token in (echo_server.token(), echo_server.token(admin=True)):  # user, app admin
            refused = await http.put(url, json=TEST_ASSOCIATIONS,
                                     headers={"authorization": f"Bearer {token}"})
            assert refused.status_code == 403
            assert "management token is required" in refused.json()["error"]["message"]
        bad_sig = {"authorization": "Bearer " + echo_server.management_token()[:-4] + "AAAA"}
        assert (await http.put(url, json=TEST_ASSOCIATIONS, headers=bad_sig)).status_code == 401

        current = await http.get(url, headers=admin_headers)
        assert current.status_code == 200 and "test-app" in current.json()["applications"]

        broken = {"applications": {"test-app": {"channels": [{"channelName": "x",
                                                              "functionNames": [7]}]}}}
        reply = await http.put(url, json=broken, headers=admin_headers)
        assert reply.status_code == 400
        assert reply.json()["error"]["path"] == "applications.test-app.channels[0].functionNames[0]"
        reply = await http.put(url, content=b"{nope", headers=admin_headers)
        assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]

        client = await connect(echo_server)
        clients.append(client)
        await client.call("subscribe", {"channels": ["plain"]})
        await publish_until(client, "plain", "abc", "abc")  # the broken PUTs changed nothing

        document = json.loads(json.dumps(TEST_ASSOCIATIONS))
        document["applications"]["test-app"]["channels"][0]["functionNames"] = ["demo-capitalize"]
        reply = await http.put(url, json=document, headers=admin_headers)
        assert reply.status_code == 200 and reply.json()["ok"] is True
        # applied at once (no polling), and written to the project's file
        before = len(client.messages)
        ack = await client.call("publish", {"channel": "plain", "message": "abc def"})
        assert ack["delivered"]
        await client.wait_for("message", before + 1)
        assert client.messages[-1]["message"] == "Abc Def"
        on_disk = json.loads((echo_server.project / "associations.json").read_text())
        assert on_disk == document
        reply = await http.put(url, json=TEST_ASSOCIATIONS, headers=admin_headers)
        assert reply.status_code == 200


async def test_health_and_ready(echo_server: EchoProcess) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.get(echo_server.url + "/health")).json() == {"status": "ok"}
        ready = await http.get(echo_server.url + "/ready")
        assert ready.status_code == 200 and ready.json()["ready"] is True


async def test_ekko_clis_put_form_the_document_signed_as_a_jwt(
    echo_server: EchoProcess, clients: list[Client]
) -> None:
    """``ekko update`` PUTs ``{token: jwt.sign(associations, SECRET)}`` with no header."""
    import jwt as pyjwt

    from tests.conftest import SECRET

    url = echo_server.url + "/associations"
    document = json.loads(json.dumps(TEST_ASSOCIATIONS))
    document["applications"]["test-app"]["channels"][0]["functionNames"] = ["demo-backwards"]
    signed = pyjwt.encode({**document, "iat": int(time.time())}, SECRET, algorithm="HS256")
    async with httpx.AsyncClient() as http:
        forged = pyjwt.encode(document, "not-the-secret-0123456789abcdef-0123", algorithm="HS256")
        refused = await http.put(url, json={"token": forged})
        assert refused.status_code == 401 and "signature" in refused.json()["error"]["message"]
        assert (await http.put(url, json={"token": "x", "more": 1})).status_code == 401
        a_user_token = echo_server.token()  # signed right, but not a document
        wrong = await http.put(url, json={"token": a_user_token})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_associations"

        accepted = await http.put(url, json={"token": signed})
        assert accepted.status_code == 200, accepted.text
        client = await connect(echo_server)
        clients.append(client)
        await client.call("subscribe", {"channels": ["plain"]})
        await publish_until(client, "plain", "abc", "cba")
        restored = pyjwt.encode(TEST_ASSOCIATIONS, SECRET, algorithm="HS256")
        assert (await http.put(url, json={"token": restored})).status_code == 200

"""End-to-end encrypted channels in a real browser: the browser client (echo/client/echo.js,
WebCrypto) and the Python reference (echo.sdk.e2e, ``cryptography``) read each other's
envelopes both ways, a tampered envelope or one made for another channel is an ``error``
event ``decrypt_failed`` (never a message, never a silent drop) and the next good message
still arrives, keys rotate by kid, and the chat demo's ``#secret`` channel works with a
shared passphrase (and shows a clear line to someone with another one).

Real Chromium through Playwright and a real ``echoctl dev`` process; the Python side is a
python-socketio client run on its own event loop in a thread (Playwright's sync API owns
the test's thread).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid as uuids
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from echo.sdk import e2e
from tests.conftest import TEST_APP, Client, EchoProcess, connect
from tests.test_browser_chat import WAIT_MS, Person, browser  # noqa: F401 (the fixture)

pytestmark = pytest.mark.browser
WIRE_TESTS = True  # every test here runs on both transports (conftest.py)

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture skips (or fails on CI)
    expect = None

T = TypeVar("T")
KEY_1 = os.urandom(32)
KEY_2 = os.urandom(32)

START = """async ([host, appName, jwt, channel, spec]) => {
  const e2e = await import("/client/echo.js");
  window.e2e = e2e;
  window.received = [];
  window.errors = [];
  window.getKeyCalls = [];
  window.states = [];
  // spec: {pattern: {kid, key?, keys?, as}}; keys come as base64url text and are given to
  // the client as `as` says: "text", "bytes" (Uint8Array), "buffer" or "cryptokey"
  const unb64 = (text) => e2e.unb64url(text);
  const convert = async (text, as) => {
    if (as === "text") return text;
    if (as === "bytes") return unb64(text);
    if (as === "buffer") return unb64(text).buffer;
    return crypto.subtle.importKey("raw", unb64(text), "AES-GCM", false, ["encrypt", "decrypt"]);
  };
  const cipher = {};
  for (const [pattern, { kid, key, keys, as }] of Object.entries(spec)) {
    const entry = { kid };
    if (key) entry.key = await convert(key, as);
    if (keys) {
      entry.getKey = async (channel, kid) => {
        window.getKeyCalls.push([channel, kid]);
        // the first kid is slow to look up: a later message must still wait its turn
        await new Promise((resolve) => setTimeout(resolve, kid === Object.keys(keys)[0] ? 300 : 5));
        return keys[kid] ? convert(keys[kid], as) : null;
      };
    }
    cipher[pattern] = entry;
  }
  const echo = new e2e.Echo({ host, appName, jwt, cipher });
  window.echo = echo;
  echo.addListener({
    message: (m) => window.received.push(m),
    error: (err) => window.errors.push(err),
    // with what had been heard by then
    state: (s) => window.states.push({ ...s, heard: [window.received.length, window.errors.length] }),
  });
  await new Promise((resolve) => echo.addListener({ state: (s) => s.state === "connected" && resolve() }));
  await echo.subscribe({ channels: [channel] });
}"""


class Loop:
    """An asyncio loop in a thread, for the Python clients beside Playwright's sync API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    yield running
    running.close()


@pytest.fixture
def python_client(loop: Loop, echo_server: EchoProcess) -> Iterator[Client]:
    client = loop.run(connect(echo_server, TEST_APP, uuid="python"))
    yield client
    loop.run(client.disconnect())


class Page:
    """A page of the server's origin running the browser client with a `cipher`."""

    def __init__(self, chromium: Any, server: EchoProcess, channel: str,
                 spec: dict[str, Any]) -> None:
        self.context = chromium.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.page_errors: list[str] = []
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.goto(server.url + "/client/echo.js")  # any page of the server's origin
        self.page.evaluate(START, [server.url, TEST_APP, server.token(), channel, spec])

    def wait(self, condition: str) -> None:
        self.page.wait_for_function(condition, timeout=WAIT_MS)

    def received(self) -> list[dict[str, Any]]:
        return self.page.evaluate("window.received")  # type: ignore[no-any-return]

    def errors(self) -> list[dict[str, Any]]:
        return self.page.evaluate("window.errors")  # type: ignore[no-any-return]

    def publish(self, channel: str, message: Any) -> dict[str, Any]:
        return self.page.evaluate(  # type: ignore[no-any-return]
            "([channel, message]) => window.echo.publish({ channel, message })", [channel, message])

    def close(self) -> None:
        self.context.close()


def fresh(prefix: str = "secret:") -> str:
    """A channel of its own (test-app's `secret:*` rule says "encrypted": true)."""
    return prefix + uuids.uuid4().hex[:10]


def seal(message: Any, key: bytes, channel: str, kid: str = "k1") -> dict[str, Any]:
    return e2e.encrypt(message, key, app=TEST_APP, channel=channel, kid=kid)


def publish(loop: Loop, client: Client, channel: str, envelope: Any) -> dict[str, Any]:
    ack: dict[str, Any] = loop.run(client.call("publish", {"channel": channel,
                                                           "message": envelope}))
    assert ack["ok"] is True, ack
    return ack


def test_browser_publishes_an_envelope_that_python_opens(
        browser: Any, echo_server: EchoProcess, loop: Loop,  # noqa: F811
        python_client: Client) -> None:
    channel = fresh()
    loop.run(python_client.call("subscribe", {"channels": [channel]}))
    page = Page(browser, echo_server, channel,
                {"secret:*": {"kid": "k1", "key": e2e.b64url(KEY_1), "as": "text"}})
    try:
        secret = {"text": "the eagle lands at noon ✓", "n": 7}
        ack = page.publish(channel, secret)
        assert ack["ok"] is True and ack["delivered"] is True, ack

        got = loop.run(python_client.wait_for_match("message", id=ack["id"]))
        envelope = got["message"]
        assert e2e.envelope_problem(envelope) is None, envelope
        assert set(envelope) == {"v", "alg", "kid", "iv", "ct"} and envelope["kid"] == "k1"
        wire = json.dumps(got, ensure_ascii=False)
        for plaintext in ("eagle", "noon", "✓", '"n"', "text"):
            assert plaintext not in wire, wire
        assert e2e.decrypt(envelope, KEY_1, app=TEST_APP, channel=channel) == secret
        # bound to its channel: the same envelope does not open anywhere else
        with pytest.raises(e2e.DecryptFailed):
            e2e.decrypt(envelope, KEY_1, app=TEST_APP, channel=channel + "x")

        # the sender's own listener hears the plaintext, marked as opened
        page.wait("window.received.length === 1")
        mine = page.received()[0]
        assert mine["message"] == secret and mine["encrypted"] is True, mine
        assert mine["id"] == ack["id"] and mine["channel"] == channel
        assert page.errors() == [] and page.page_errors == []
    finally:
        page.close()


def test_python_envelopes_reach_the_browser_as_plaintext_in_order_and_in_history(
        browser: Any, echo_server: EchoProcess, loop: Loop,  # noqa: F811
        python_client: Client) -> None:
    # `secret` keeps history: live messages and history() are opened the same way
    channel = "secret"
    page = Page(browser, echo_server, channel,
                {channel: {"kid": "k1", "key": e2e.b64url(KEY_1), "as": "bytes"}})
    try:
        messages = [{"n": n, "text": f"from python {n}", "emoji": "🔐"} for n in range(30)]
        envelopes = [seal(message, KEY_1, channel) for message in messages]

        async def burst() -> list[dict[str, Any]]:  # all in flight at once
            return list(await asyncio.gather(*(
                python_client.call("publish", {"channel": channel, "message": envelope})
                for envelope in envelopes)))

        acks = loop.run(burst())
        assert all(ack["ok"] for ack in acks), acks
        page.wait(f"window.received.length >= {len(messages)}")
        received = page.received()
        by_seq = sorted(acks, key=lambda ack: ack["seq"])
        # opening is async; the listener still hears the channel's messages in their order
        assert [m["id"] for m in received] == [ack["id"] for ack in by_seq]
        assert [m["seq"] for m in received] == sorted(m["seq"] for m in received)
        assert sorted(m["message"]["n"] for m in received) == list(range(30))
        assert all(m["encrypted"] is True and m["message"]["emoji"] == "🔐" for m in received)

        reply = page.page.evaluate(
            "([channel]) => window.echo.history({ channel, limit: 30, reverse: true })", [channel])
        ids = {ack["id"] for ack in acks}
        kept = [p for p in reply["publications"] if p["id"] in ids]
        assert len(kept) == 30, reply
        assert all(p["encrypted"] is True and "ct" not in p["message"] for p in kept)
        assert sorted(p["message"]["n"] for p in kept) == list(range(30))
        assert page.errors() == [] and page.page_errors == []
    finally:
        page.close()


def test_tampered_moved_and_unknown_kid_envelopes_are_decrypt_failed_errors(
        browser: Any, echo_server: EchoProcess, loop: Loop,  # noqa: F811
        python_client: Client) -> None:
    channel = fresh()
    page = Page(browser, echo_server, channel,
                {"secret:*": {"kid": "k1", "key": e2e.b64url(KEY_1), "as": "cryptokey"}})
    try:
        tampered = seal({"text": "tampered"}, KEY_1, channel)
        ct = tampered["ct"]
        middle = len(ct) // 2
        tampered["ct"] = ct[:middle] + ("A" if ct[middle] != "A" else "B") + ct[middle + 1:]
        moved = seal({"text": "moved"}, KEY_1, fresh())  # right key, made for another channel
        unknown_kid = seal({"text": "rotated away"}, KEY_2, channel, kid="k9")
        wrong_key = seal({"text": "wrong key"}, KEY_2, channel)
        bad = [publish(loop, python_client, channel, envelope)["id"]
               for envelope in (tampered, moved, unknown_kid, wrong_key)]
        good = publish(loop, python_client, channel, seal({"text": "good"}, KEY_1, channel))

        page.wait("window.received.length >= 1 && window.errors.length >= 4")
        received = page.received()
        assert [m["message"] for m in received] == [{"text": "good"}], received
        assert received[0]["id"] == good["id"]
        errors = page.errors()
        assert [e["id"] for e in errors] == bad, errors  # in order, before the good one
        assert all(e["code"] == "decrypt_failed" and e["channel"] == channel for e in errors)
        assert "does not open" in errors[0]["message"], errors[0]
        assert "does not open" in errors[1]["message"], errors[1]
        assert "no key for kid 'k9'" in errors[2]["message"], errors[2]
        assert "does not open" in errors[3]["message"], errors[3]

        # the browser's own helpers reject the same way (no throw escapes elsewhere)
        outcome = page.page.evaluate("""async ([envelope, key, channel]) => {
          try {
            await window.e2e.decryptMessage(envelope, key, { appName: "test-app", channel });
            return null;
          } catch (err) { return [err.name, err.code]; }
        }""", [moved, e2e.b64url(KEY_1), channel])
        assert outcome == ["DecryptError", "decrypt_failed"]
        assert page.page_errors == [], page.page_errors
    finally:
        page.close()


def test_keys_rotate_by_kid_and_get_key_is_asked_once_per_kid(
        browser: Any, echo_server: EchoProcess, loop: Loop,  # noqa: F811
        python_client: Client) -> None:
    channel = fresh()
    loop.run(python_client.call("subscribe", {"channels": [channel]}))
    keys = {"k1": e2e.b64url(KEY_1), "k2": e2e.b64url(KEY_2)}
    # the page publishes under k2 (the current key) and opens older envelopes by their kid;
    # looking k1 up takes 300 ms, k2 5 ms: the k2 message still waits for the k1 one
    page = Page(browser, echo_server, channel,
                {"secret:*": {"kid": "k2", "keys": keys, "as": "buffer"}})
    try:
        old = publish(loop, python_client, channel, seal({"text": "old key"}, KEY_1, channel, "k1"))
        new = publish(loop, python_client, channel, seal({"text": "new key"}, KEY_2, channel, "k2"))
        again = publish(loop, python_client, channel,
                        seal({"text": "old key again"}, KEY_1, channel, "k1"))
        page.wait("window.received.length >= 3")
        received = page.received()
        assert [(m["id"], m["message"]["text"]) for m in received] == [
            (old["id"], "old key"), (new["id"], "new key"), (again["id"], "old key again")]

        ack = page.publish(channel, {"text": "from the browser"})
        got = loop.run(python_client.wait_for_match("message", id=ack["id"]))
        assert got["message"]["kid"] == "k2"
        opened = e2e.decrypt(got["message"], lambda kid: e2e.unb64url(keys[kid]),
                             app=TEST_APP, channel=channel)
        assert opened == {"text": "from the browser"}
        # imported keys are cached: one lookup per (channel, kid)
        calls = page.page.evaluate("window.getKeyCalls")
        assert sorted(map(tuple, calls)) == [(channel, "k1"), (channel, "k2")], calls
        assert page.errors() == [] and page.page_errors == []
    finally:
        page.close()


def test_recovered_messages_are_opened_in_order_before_connected(
        browser: Any, echo_server: EchoProcess, loop: Loop,  # noqa: F811
        python_client: Client) -> None:
    channel = "secret"  # keeps history: a page back online recovers what it missed
    # the missed messages come under a new kid, k2, whose lookup takes 300 ms
    keys = {"k2": e2e.b64url(KEY_2), "k1": e2e.b64url(KEY_1)}
    page = Page(browser, echo_server, channel,
                {channel: {"kid": "k1", "keys": keys, "as": "text"}})
    try:
        first = publish(loop, python_client, channel, seal({"n": 0}, KEY_1, channel))
        page.wait("window.received.length === 1")
        page.context.set_offline(True)
        page.wait("window.states.some((s) => s.state === 'disconnected')")
        missed = [publish(loop, python_client, channel, seal({"n": n}, KEY_2, channel, "k2"))
                  for n in range(1, 4)]
        forged = publish(loop, python_client, channel, seal({"n": -1}, KEY_1, channel, "k2"))
        missed.append(publish(loop, python_client, channel, seal({"n": 4}, KEY_1, channel)))
        page.context.set_offline(False)
        page.wait("window.states.some((s) => s.state === 'connected' && s.recovered)")
        # everything recovered was heard (opened, or an error) before "connected"
        states = page.page.evaluate("window.states")
        assert [s["heard"] for s in states if s.get("recovered")] == [[5, 1]], states
        received = page.received()
        assert [m["id"] for m in received] == [first["id"], *(ack["id"] for ack in missed)]
        assert [m["message"]["n"] for m in received] == [0, 1, 2, 3, 4]
        assert [(e["code"], e["id"]) for e in page.errors()] == [("decrypt_failed", forged["id"])]
        assert page.page_errors == []
    finally:
        page.close()


def unlock(person: Person, passphrase: str) -> None:
    person.open("secret")
    form = person.page.locator("#passphrase-form")
    expect(form).to_be_visible()
    person.page.fill("#passphrase", passphrase)
    person.page.click("#unlock")
    expect(form).to_have_attribute("data-state", "unlocked")


def test_chat_demo_secret_channel_with_a_shared_passphrase(
        browser: Any, echo_server: EchoProcess) -> None:  # noqa: F811
    ada = Person(browser, echo_server, "Ada", "🦊")
    bob = Person(browser, echo_server, "Bob", "🐼")
    eve = Person(browser, echo_server, "Eve", "🐸")
    try:
        # no passphrase yet: nothing is sent
        ada.say("secret", "too early")
        expect(ada.notices("secret", "error")).to_contain_text("passphrase")
        expect(ada.page.locator("#message")).to_have_value("too early")
        ada.page.fill("#message", "")

        unlock(ada, "correct horse battery staple")
        unlock(bob, "correct horse battery staple")
        unlock(eve, "a guess")
        ada.say("secret", "meet me at the old mill")
        for person in (ada, bob):
            person.sees_last("secret", "meet me at the old mill", by=ada)
        bob.say("secret", "see you there")
        for person in (ada, bob):
            person.sees_last("secret", "see you there", by=bob)
            expect(person.texts("secret")).to_have_count(2)
            expect(person.notices("secret", "locked")).to_have_count(0)
        expect(bob.page.locator('.messages[data-channel="secret"] .message-lock')).to_have_count(2)

        # another passphrase is another key: a clear line per message, no text
        locked = eve.notices("secret", "locked")
        expect(locked).to_have_count(2)
        expect(locked.first).to_have_text("🔒could not decrypt (wrong passphrase?)")
        expect(eve.texts("secret")).to_have_count(0)
        eve.screenshot("chat-eve-secret-locked.png")
        bob.screenshot("chat-bob-secret.png")

        # the server relayed (and kept) only envelopes
        traces = httpx.get(echo_server.url + "/dev/traces",
                           params={"app": "chat-demo", "channel": "secret"}, timeout=5).text
        assert "old mill" not in traces and "see you there" not in traces
        assert '"ct"' in traces

        # the right passphrase, typed again, opens the next messages
        unlock(eve, "correct horse battery staple")
        ada.say("secret", "welcome, eve")
        eve.sees_last("secret", "welcome, eve", by=ada)
        for person in (ada, bob, eve):
            assert person.errors == [], (person.name, person.errors)
    finally:
        for person in (ada, bob, eve):
            person.close()

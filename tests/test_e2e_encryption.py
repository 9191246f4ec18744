"""End-to-end encrypted channels (issue 18): the server relays and keeps envelopes it cannot
read; clients seal and open them; a trusted function's host opens and seals around it.

The server side runs on Redis with history on, and Redis is watched with ``MONITOR`` for the
whole exchange: no plaintext may reach the server's log, Redis, history or the inspector.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from echo.core.associations import AssociationsError, parse_associations
from echo.core.envelope import envelope_problem
from echo.runners import trusted
from echo.sdk import AsyncServerApi, ChannelCipher, EchoError, RealtimeClient, channel_key, e2e
from tests.conftest import SECRET, TEST_APP, EchoProcess, RedisServer, make_project

pytestmark = pytest.mark.anyio

KEY = bytes(range(32))
MASTER = {"k1": os.urandom(32), "k2": os.urandom(32)}
SECRET_TEXT = "the eagle lands at dawn"


# -- the envelope -------------------------------------------------------------------------


@pytest.mark.unit
def test_an_envelope_opens_only_with_its_key_on_its_channel() -> None:
    sealed = e2e.encrypt({"text": SECRET_TEXT}, KEY, app="a", channel="secret", kid="k1")
    assert set(sealed) == {"v", "alg", "kid", "iv", "ct"} and envelope_problem(sealed) is None
    assert SECRET_TEXT not in json.dumps(sealed)
    assert e2e.decrypt(sealed, KEY, app="a", channel="secret") == {"text": SECRET_TEXT}
    # two seals of one message differ (fresh IV), both open
    again = e2e.encrypt({"text": SECRET_TEXT}, KEY, app="a", channel="secret", kid="k1")
    assert again["iv"] != sealed["iv"] and again["ct"] != sealed["ct"]

    def refused(envelope: Any, key: Any = KEY, app: str = "a", channel: str = "secret") -> str:
        with pytest.raises(e2e.DecryptFailed) as caught:
            e2e.decrypt(envelope, key, app=app, channel=channel)
        assert caught.value.code == "decrypt_failed"
        return caught.value.reason

    assert "does not open" in refused(sealed, key=bytes(32))                 # wrong key
    assert "does not open" in refused(sealed, channel="secret2")             # moved channel
    assert "does not open" in refused(sealed, app="b")                       # moved app
    assert "does not open" in refused({**sealed, "kid": "k2"})               # kid swapped
    flipped = sealed["ct"][:-2] + ("A" if sealed["ct"][-2] != "A" else "B") + sealed["ct"][-1]
    assert "does not open" in refused({**sealed, "ct": flipped})             # tampered
    assert "no key for kid" in refused(sealed, key=lambda kid: None)         # missing key
    assert "not an envelope" in refused("plain text")
    assert "lacks" in refused({"v": 1})
    assert "iv" in refused({**sealed, "iv": "short"})


@pytest.mark.unit
def test_keys_derive_per_channel_and_rotate_by_kid() -> None:
    one = channel_key(MASTER["k1"], "app", "secret")
    assert one == channel_key(MASTER["k1"], "app", "secret") and len(one) == 32
    assert one != channel_key(MASTER["k1"], "app", "secret2")
    assert one != channel_key(MASTER["k1"], "app2", "secret")
    assert one != channel_key(MASTER["k2"], "app", "secret")
    with pytest.raises(ValueError, match="at least 32"):
        channel_key(b"short", "app", "secret")
    # rotation: the client publishes under k2 now and still opens what k1 sealed
    cipher = ChannelCipher(kid="k2", get_key=lambda ch, kid: channel_key(MASTER[kid], "app", ch)
                           if kid in MASTER else None)
    old = e2e.encrypt("old", channel_key(MASTER["k1"], "app", "s"), app="app", channel="s", kid="k1")
    new = e2e.encrypt("new", cipher.key_for("s", "k2") or b"", app="app", channel="s", kid="k2")
    lookup = lambda kid: cipher.key_for("s", kid)  # noqa: E731
    assert [e2e.decrypt(m, lookup, app="app", channel="s") for m in (old, new)] == ["old", "new"]
    assert e2e.key_from_passphrase("correct horse", "app", "s") == \
        e2e.key_from_passphrase("correct horse", "app", "s") != \
        e2e.key_from_passphrase("correct horse", "app", "t")
    keys = e2e.keys_from_text(json.dumps({k: e2e.b64url(v) for k, v in MASTER.items()}))
    assert keys == MASTER
    with pytest.raises(ValueError, match="at least 32"):
        e2e.keys_from_text(json.dumps({"k1": e2e.b64url(b"short")}))


@pytest.mark.unit
def test_a_trusted_host_opens_and_seals_under_the_same_kid() -> None:
    key = channel_key(MASTER["k2"], "app", "vault")
    event = e2e.encrypt({"text": "hi"}, key, app="app", channel="vault", kid="k2")
    plain, sealer = trusted.open_event(event, {"app": "app", "channel": "vault"}, MASTER)
    assert plain == {"text": "hi"}
    result = sealer.seal({"text": "HI"})
    assert result["kid"] == "k2"
    assert e2e.decrypt(result, key, app="app", channel="vault") == {"text": "HI"}
    assert sealer.seal(None) is None
    with pytest.raises(LookupError, match="ECHO_E2E_KEYS is not set"):
        trusted.master_keys({})
    with pytest.raises(e2e.DecryptFailed, match="no master key for kid"):
        trusted.open_event({**event, "kid": "k9"}, {"app": "app", "channel": "vault"}, MASTER)


@pytest.mark.unit
def test_associations_refuse_an_untrusted_function_on_an_encrypted_channel() -> None:
    def doc(entry: dict[str, Any]) -> dict[str, Any]:
        return {"applications": {"app": {"channels": [{"channelName": "s", **entry}]}}}

    assert parse_associations(doc({"encrypted": True})).match("app", "s").encrypted
    assert not parse_associations(doc({})).match("app", "s").encrypted
    with pytest.raises(AssociationsError, match="'shout' cannot run on an encrypted channel"):
        parse_associations(doc({"encrypted": True, "functionNames": ["shout"]}))
    trusted_rule = parse_associations(doc({"encrypted": True, "functionNames": ["shout"],
                                           "trustedFunctions": ["shout"]})).match("app", "s")
    assert trusted_rule.encrypted and trusted_rule.functions == ("shout",)
    with pytest.raises(AssociationsError, match="not in this channel's functionNames"):
        parse_associations(doc({"encrypted": True, "trustedFunctions": ["other"]}))
    with pytest.raises(AssociationsError, match="only an encrypted channel"):
        parse_associations(doc({"functionNames": ["shout"], "trustedFunctions": ["shout"]}))
    with pytest.raises(AssociationsError, match="must be true or false"):
        parse_associations(doc({"encrypted": "yes"}))


# -- through a live server on Redis -----------------------------------------------------


class Monitor:
    """Everything Redis is asked, from ``MONITOR``, on a thread of its own."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.seen = bytearray()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            self.seen += chunk

    def close(self) -> bytes:
        time.sleep(0.3)
        self.sock.close()
        self.thread.join(2)
        return bytes(self.seen)


@pytest.fixture(scope="module")
def encrypted_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EchoProcess, RedisServer]]:
    redis = RedisServer(tmp_path_factory.mktemp("redis")).start()
    project = make_project(tmp_path_factory.mktemp("e2e"))
    shout = project / "functions" / "js-shout"  # Ekko's JavaScript form, trusted too
    shout.mkdir()
    (shout / "index.js").write_text(
        "exports.handler = async (message) => ({ ...message, text: message.text.toUpperCase() });\n")
    for name, source, toml in (
            ("tell-all", "def handler(event, context):\n    raise ValueError(event['text'])\n", ""),
            ("too-big-pass", "def handler(event, context):\n    return 'x' * 100000\n",
             'on_error = "pass"\n')):
        (project / "functions" / name).mkdir()
        (project / "functions" / name / "handler.py").write_text(source)
        (project / "functions" / name / "function.toml").write_text(toml)
    associations = json.loads((project / "associations.json").read_text())
    associations["applications"][TEST_APP]["channels"] += [
        {"channelName": "vault-js", "functionNames": ["js-shout"], "trustedFunctions": ["js-shout"],
         "encrypted": True},
        {"channelName": "vault-raise", "functionNames": ["tell-all"],
         "trustedFunctions": ["tell-all"], "encrypted": True},
        {"channelName": "big-pass", "functionNames": ["too-big-pass"]}]
    (project / "associations.json").write_text(json.dumps(associations))
    keys = json.dumps({kid: e2e.b64url(key) for kid, key in MASTER.items()})
    server = EchoProcess(project, env={"ECHO_REDIS_URL": redis.url, "ECHO_E2E_KEYS": keys}).start()
    yield server, redis
    server.stop()
    redis.stop()


def derived(channel: str, kid: str) -> bytes | None:
    return channel_key(MASTER[kid], TEST_APP, channel) if kid in MASTER else None


async def sdk_client(server: EchoProcess, cipher: dict[str, ChannelCipher] | None) -> RealtimeClient:
    client = RealtimeClient(server.url, TEST_APP, token=server.token(), cipher=cipher)
    await client.connect()
    return client


def collector(client: RealtimeClient, event: str) -> list[Any]:
    got: list[Any] = []
    client.on(event, got.append)
    return got


async def dev_traces(server: EchoProcess) -> str:
    async with httpx.AsyncClient(timeout=5) as http:
        return (await http.get(server.url + "/dev/traces")).text


async def until(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_plaintext_publish_on_an_encrypted_channel_is_refused(
        encrypted_server: tuple[EchoProcess, RedisServer]) -> None:
    server, _ = encrypted_server
    client = await sdk_client(server, None)
    try:
        with pytest.raises(EchoError) as caught:
            await client.publish("secret", {"text": SECRET_TEXT})
        assert caught.value.code == "bad_request"
        assert "end-to-end encrypted" in caught.value.message and '"alg": "A256GCM"' in caught.value.message
        assert SECRET_TEXT not in caught.value.message
        with pytest.raises(EchoError, match="end-to-end encrypted"):  # a glob's channel too
            await client.publish("secret:room1", "hello")
        # a plain channel is unaffected; the server API is held to the same rule
        assert (await client.publish("plain", {"text": "fine"}))["ok"]
        async with AsyncServerApi(server.url, TEST_APP, secret=SECRET) as api:
            with pytest.raises(EchoError, match="end-to-end encrypted"):
                await api.publish("secret", {"text": SECRET_TEXT})
            sealed = e2e.encrypt("from the backend", derived("secret", "k1") or b"",
                                 app=TEST_APP, channel="secret", kid="k1")
            assert (await api.publish("secret", sealed))["ok"]
    finally:
        await client.close()


async def test_envelopes_reach_every_subscriber_and_nothing_readable_is_kept(
        encrypted_server: tuple[EchoProcess, RedisServer]) -> None:
    server, redis = encrypted_server
    monitor = Monitor(redis.port)
    cipher = {"secret": ChannelCipher(kid="k1", get_key=derived)}
    alice, bob = await sdk_client(server, cipher), await sdk_client(server, cipher)
    eve = await sdk_client(server, None)  # subscribed, without the key
    mallory = await sdk_client(server, {"secret": ChannelCipher(kid="k1", key=bytes(32))})
    try:
        got = {name: collector(c, "message") for name, c in
               (("bob", bob), ("eve", eve), ("alice", alice), ("mallory", mallory))}
        errors = collector(mallory, "error")
        for c in (alice, bob, eve, mallory):
            await c.subscribe(["secret"])
        ack = await alice.publish("secret", {"text": SECRET_TEXT})
        assert ack["ok"] and ack["delivered"]
        await until(lambda: all(got[n] for n in ("bob", "eve", "alice")) and errors)
        assert got["bob"][0]["message"] == {"text": SECRET_TEXT} and got["bob"][0]["encrypted"]
        assert got["alice"][0]["message"] == {"text": SECRET_TEXT}
        relayed = got["eve"][0]["message"]
        assert envelope_problem(relayed) is None and SECRET_TEXT not in json.dumps(relayed)
        # a wrong key: an error event, not a message and not a crash
        assert got["mallory"] == [] and errors[0]["code"] == "decrypt_failed"
        assert errors[0]["channel"] == "secret" and errors[0]["id"] == ack["id"]

        # history keeps the envelope: opened by a key holder, opaque to anyone else
        assert (await bob.history("secret"))["publications"][-1]["message"] == {"text": SECRET_TEXT}
        stored = (await eve.history("secret"))["publications"][-1]["message"]
        assert envelope_problem(stored) is None

        # a ciphertext moved from another channel (by a client allowed to publish there) is
        # relayed, as the server cannot tell, and refused by every receiving client
        moved = e2e.encrypt({"text": "moved"}, derived("secret:other", "k1") or b"",
                            app=TEST_APP, channel="secret:other", kid="k1")
        bob_errors = collector(bob, "error")
        await eve.publish("secret", moved)
        await until(lambda: bob_errors)
        assert bob_errors[0]["code"] == "decrypt_failed" and len(got["bob"]) == 1
        # and the next good message still arrives
        await alice.publish("secret", {"text": "after"})
        await until(lambda: len(got["bob"]) == 2)
        assert got["bob"][1]["message"] == {"text": "after"}
    finally:
        for c in (alice, bob, eve, mallory):
            await c.close()
    seen = monitor.close()
    assert b"XADD" in seen or b"xadd" in seen.lower(), "history was not written through Redis"
    assert SECRET_TEXT.encode() not in seen and b"after" not in seen
    assert SECRET_TEXT not in server.log()
    traces = await dev_traces(server)
    assert SECRET_TEXT not in traces


@pytest.mark.parametrize(("channel", "function", "shouted"), [
    ("vault", "demo-angry", "QUIET PLEASE!!!"),   # Python
    ("vault-js", "js-shout", "QUIET PLEASE"),     # JavaScript
])
async def test_a_trusted_function_transforms_what_subscribers_decrypt(
        encrypted_server: tuple[EchoProcess, RedisServer], channel: str, function: str,
        shouted: str) -> None:
    """The function is trusted with the key: its worker opens the envelope, the function
    upper-cases the text, the worker seals the result; the server sees envelopes only."""
    server, redis = encrypted_server
    monitor = Monitor(redis.port)
    cipher = {channel: ChannelCipher(kid="k2", get_key=derived)}
    publisher, subscriber = await sdk_client(server, cipher), await sdk_client(server, cipher)
    try:
        got = collector(subscriber, "message")
        await subscriber.subscribe([channel])
        ack = await publisher.publish(channel, {"text": "quiet please"})
        assert ack["ok"], ack
        await until(lambda: got)
        assert got[0]["message"] == {"text": shouted}
    finally:
        await publisher.close()
        await subscriber.close()
    seen = monitor.close()
    assert b"QUIET PLEASE" not in seen and b"quiet please" not in seen
    traces = await dev_traces(server)
    assert function in traces and "QUIET" not in traces and "quiet please" not in traces
    # the inspector's replay runs the trusted function the same way, on ciphertext only
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        listed = (await http.get("/dev/traces", params={"channel": channel})).json()["traces"]
        replayed = (await http.post(f"/dev/traces/{listed[0]['id']}/replay")).json()
    assert replayed["ok"] and [h.get("error") for h in replayed["hops"]] == [None], replayed
    assert envelope_problem(replayed["output"]) is None
    assert e2e.decrypt(replayed["output"], derived(channel, "k2") or b"", app=TEST_APP,
                       channel=channel) == {"text": shouted}
    assert "quiet please" not in server.log() and "QUIET" not in server.log()


async def test_a_trusted_function_without_keys_fails_with_the_fix(tmp_path: Path) -> None:
    project = make_project(tmp_path / "no-keys")
    env = {k: v for k, v in os.environ.items() if k != "ECHO_E2E_KEYS"}
    server = EchoProcess(project, env=env).start()
    client = await sdk_client(server, {"vault": ChannelCipher(kid="k1", get_key=derived)})
    try:
        with pytest.raises(EchoError) as caught:
            await client.publish("vault", {"text": "x"})
        assert caught.value.code == "function_error"
        assert "ECHO_E2E_KEYS is not set" in caught.value.message
    finally:
        await client.close()
        server.stop()


@pytest.mark.unit
def test_a_function_that_returns_plaintext_on_an_encrypted_channel_is_a_bad_result() -> None:
    """A misconfigured host (not sealing) must not hand subscribers plaintext."""
    from echo.core.pipeline import _check_sealed
    from echo.core.runners import FunctionError, FunctionErrorKind

    _check_sealed("f", None)
    _check_sealed("f", e2e.encrypt("x", KEY, app="a", channel="c", kid="k1"))
    with pytest.raises(FunctionError) as caught:
        _check_sealed("f", {"text": "plain"})
    assert caught.value.kind == FunctionErrorKind.BAD_RESULT
    assert "must return an envelope" in str(caught.value)


@pytest.mark.unit
def test_base64url_is_what_browsers_write() -> None:
    """No padding, URL alphabet: what the browser client's encoder produces."""
    assert e2e.b64url(b"\xfb\xff") == "-_8"
    assert e2e.unb64url("-_8") == b"\xfb\xff"
    assert base64.urlsafe_b64decode("-_8=") == b"\xfb\xff"


async def test_an_encrypted_channels_function_error_never_carries_the_plaintext(
        encrypted_server: tuple[EchoProcess, RedisServer]) -> None:
    """An exception's text may quote the message (``ValueError(event['text'])``): on an
    encrypted channel only its type leaves the function's host."""
    server, redis = encrypted_server
    monitor = Monitor(redis.port)
    client = await sdk_client(server, {"vault-raise": ChannelCipher(kid="k1", get_key=derived)})
    try:
        with pytest.raises(EchoError) as caught:
            await client.publish("vault-raise", {"text": "launch code 0000"})
        assert caught.value.code == "function_error" and "ValueError" in caught.value.message
        assert "launch code" not in caught.value.message
    finally:
        await client.close()
    assert b"launch code" not in monitor.close()
    assert "launch code" not in await dev_traces(server)


async def test_a_refused_result_does_not_go_on_past_a_pass_function(
        encrypted_server: tuple[EchoProcess, RedisServer]) -> None:
    """on_error = "pass" goes on with the function's input, never with the result that was
    just refused (here: over max_message_bytes)."""
    server, _ = encrypted_server
    client = await sdk_client(server, None)
    try:
        got = collector(client, "message")
        await client.subscribe(["big-pass"])
        assert (await client.publish("big-pass", {"text": "orig"}))["ok"]
        await until(lambda: got)
        assert got[0]["message"] == {"text": "orig"}
    finally:
        await client.close()


@pytest.mark.unit
def test_decrypt_fails_cleanly_on_what_a_key_holder_can_seal() -> None:
    deep = "[" * 5000 + "]" * 5000  # sealed as raw text: not something encrypt() would write
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    iv = os.urandom(12)
    for plaintext in (deep.encode(), b'{"x": NaN}', b"my pin is 1234"):
        ct = AESGCM(KEY).encrypt(iv, plaintext, e2e.associated_data("a", "c", "k1"))
        envelope = {"v": 1, "alg": "A256GCM", "kid": "k1", "iv": e2e.b64url(iv), "ct": e2e.b64url(ct)}
        with pytest.raises(e2e.DecryptFailed) as caught:
            e2e.decrypt(envelope, KEY, app="a", channel="c")
        assert "pin" not in caught.value.reason
        with pytest.raises(e2e.DecryptFailed):  # the worker's path too
            trusted.open_event(envelope, {"app": "a", "channel": "c"}, {"k1": KEY})

    def broken_lookup(kid: str) -> bytes:
        raise RuntimeError("vault down")

    sealed = e2e.encrypt("x", KEY, app="a", channel="c", kid="k1")
    with pytest.raises(e2e.DecryptFailed, match="lookup"):
        e2e.decrypt(sealed, broken_lookup, app="a", channel="c")
    with pytest.raises(ValueError):  # browsers would refuse it: so does the sealer
        e2e.encrypt({"x": float("nan")}, KEY, app="a", channel="c", kid="k1")
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    assert e2e.key_from_passphrase(nfc, "a", "c") == e2e.key_from_passphrase(nfd, "a", "c")


@pytest.mark.unit
def test_a_trusted_function_must_run_where_keys_can_open_envelopes(tmp_path: Path) -> None:
    from echo.core.functions import missing_functions

    for name, toml in (("local-one", ""), ("fast-one", 'runner = "inline"\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "handler.py").write_text("def handler(e, c):\n    return e\n")
        (tmp_path / name / "function.toml").write_text(toml)
    doc = parse_associations({"applications": {"app": {"channels": [
        {"channelName": "s", "encrypted": True, "functionNames": ["local-one", "fast-one"],
         "trustedFunctions": ["local-one", "fast-one"]}]}}})
    (problem,) = missing_functions(doc, tmp_path)
    assert "trustedFunctions[1]" in problem and "inline runner" in problem

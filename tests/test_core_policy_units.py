"""In-process tests of the core's policy modules: tokens and capabilities, function specs,
the file store, function errors. The fast tier: no server, no network."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import jwt
import pytest

from echo.core import auth
from echo.core.associations import parse_associations
from echo.core.auth import AuthError, issue_management_token, issue_token, verify_token
from echo.core.functions import FunctionConfigError, load_spec
from echo.core.runners import FunctionError, FunctionErrorKind
from echo.core.store import FileStore

pytestmark = pytest.mark.unit

SECRET = "unit-secret-0123456789abcdef-0123456789"
OTHER = "other-secret-0123456789abcdef-012345678"


def test_a_token_verifies_with_its_secret_and_names_its_app() -> None:
    claims = verify_token(SECRET, issue_token(SECRET, "chat", admin=True), app="chat")
    assert (claims.app, claims.admin, claims.manage) == ("chat", True, False)
    assert verify_token([OTHER, SECRET], issue_token(SECRET, "chat")).app == "chat"  # rotation


@pytest.mark.parametrize(("token", "why"), [
    (None, "missing token"),
    ("", "missing token"),
    ("not.a.jwt", "invalid token"),
    (issue_token(OTHER, "chat"), "bad token signature"),
    (issue_token(SECRET, "other"), "token is for app 'other', not 'chat'"),
    (jwt.encode({"appName": "chat", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"),
     "token expired"),
    (jwt.encode({"admin": True}, SECRET, algorithm="HS256"), "no appName claim"),
    (jwt.encode({"appName": "chat", "admin": "yes"}, SECRET, algorithm="HS256"),
     "admin and manage claims must be true or false"),
    (jwt.encode({"appName": "chat"}, SECRET, algorithm="HS512"), "algorithm not allowed"),
])
def test_refused_tokens_say_why(token: object, why: str) -> None:
    with pytest.raises(AuthError, match=why):
        verify_token(SECRET, token, app="chat")


def test_a_remembered_token_is_still_held_to_its_expiry_its_app_and_its_secret(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The verified-token cache saves the HMAC on a repeat, never a check that matters."""
    token = issue_token(SECRET, "chat", admin=True, ttl=60)
    assert verify_token(SECRET, token, app="chat").admin
    assert (token, (SECRET,)) in auth.VERIFIED.entries  # the repeat below is a cache hit
    with pytest.raises(AuthError, match="token is for app 'chat', not 'other'"):
        verify_token(SECRET, token, app="other")
    with pytest.raises(AuthError, match="bad token signature"):  # the secret was rotated away
        verify_token(OTHER, token, app="chat")
    later = time.time() + 60 + auth.LEEWAY_SECONDS + 1
    monkeypatch.setattr(auth.time, "time", lambda: later)
    with pytest.raises(AuthError, match="token expired"):
        verify_token(SECRET, token, app="chat")
    assert (token, (SECRET,)) not in auth.VERIFIED.entries
    monkeypatch.undo()
    not_before = int(time.time()) - 1
    early = jwt.encode({"appName": "chat", "nbf": not_before}, SECRET, algorithm="HS256")
    verify_token(SECRET, early)
    monkeypatch.setattr(auth.time, "time", lambda: not_before - auth.LEEWAY_SECONDS - 10)
    with pytest.raises(AuthError, match="not valid yet"):  # a clock set back: still checked
        verify_token(SECRET, early)


def test_the_verified_token_cache_keeps_only_accepted_tokens_and_is_bounded() -> None:
    cache = auth.VerifiedTokens(size=3)
    claims = verify_token(SECRET, issue_token(SECRET, "chat"))
    for n in range(5):
        cache.put(f"t{n}", (SECRET,), claims, {"exp": time.time() + 60})
    assert list(cache.entries) == [(f"t{n}", (SECRET,)) for n in (2, 3, 4)]
    before = len(auth.VERIFIED.entries)
    with pytest.raises(AuthError):
        verify_token(SECRET, issue_token(OTHER, "chat"))
    assert len(auth.VERIFIED.entries) == before


def test_capabilities_limit_operations_per_channel_pattern() -> None:
    token = issue_token(SECRET, "chat", capabilities={"room:*": ["subscribe", "publish"],
                                                      "news": ["subscribe"]})
    claims = verify_token(SECRET, token, app="chat")
    assert claims.may("publish", "room:1") and claims.may("subscribe", "news")
    assert not claims.may("publish", "news") and not claims.may("subscribe", "other")
    bad = issue_token(SECRET, "chat", capabilities={"news": ["fly"]})
    with pytest.raises(AuthError, match="unknown operation 'fly'"):
        verify_token(SECRET, bad)


def test_a_management_token_is_not_an_app_token() -> None:
    claims = verify_token(SECRET, issue_management_token(SECRET))
    assert claims.manage and not claims.admin


def test_function_spec_defaults_and_named_errors(tmp_path: Path) -> None:
    folder = tmp_path / "shout"
    folder.mkdir()
    (folder / "handler.py").write_text("def handler(event, context):\n    return event\n")
    spec = load_spec(folder, default_timeout=2.5)
    assert (spec.timeout, spec.retries, spec.on_error, spec.concurrency) == (2.5, 0, "error", 0)
    (folder / "function.toml").write_text("retries = 11\n")
    with pytest.raises(FunctionConfigError, match="retries must be a whole number from 0 to 10"):
        load_spec(folder)
    (folder / "function.toml").write_text("colour = 'red'\n")
    with pytest.raises(FunctionConfigError, match="unknown key 'colour'"):
        load_spec(folder)
    (folder / "function.toml").write_text("on_error = 'shrug'\n")
    with pytest.raises(FunctionConfigError, match="on_error must be one of"):
        load_spec(folder)


def test_function_error_kinds_are_the_documented_ones() -> None:
    assert FunctionError("f", "timeout", "slow").kind is FunctionErrorKind.TIMEOUT
    # a worker answering with a kind this version does not know still gives a known kind
    assert FunctionError("f", "exploded", "?").kind is FunctionErrorKind.RAISED
    assert str(FunctionError("f", FunctionErrorKind.CRASHED, "gone")) == "function 'f' crashed: gone"


def test_file_store_round_trip_keeps_the_authors_formatting(tmp_path: Path) -> None:
    path = tmp_path / "associations.json"
    document = {"applications": {"chat": {"channels": [
        {"channelName": "angry", "functionNames": ["demo-angry"]}]}}}
    path.write_text(json.dumps(document))  # one line, as its author wrote it
    store = FileStore(path)
    loaded = asyncio.run(store.load())
    assert loaded.document == document
    asyncio.run(store.save(loaded))
    assert path.read_text() == json.dumps(document)  # unchanged: not rewritten
    changed = parse_associations({"applications": {"chat": {"channels": []}}})
    asyncio.run(store.save(changed))
    assert json.loads(path.read_text()) == changed.document
    assert not list(tmp_path.glob(".associations.*"))  # no temporary file left behind

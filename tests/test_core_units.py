"""In-process tests of the core's small pieces: payload parsing, error shapes, limits,
settings, frames and the memory broker. No server, no network: the fast tier."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from echo.broker.memory import MemoryBroker
from echo.config import ConfigError, load_settings, redis_urls, to_bool
from echo.core import protocol
from echo.core.limits import ConnectionCounts, TokenBucket
from echo.core.protocol import ErrorCode, ProtocolError
from echo.core.realtime import Rooms
from echo.core.runners import FunctionErrorKind
from echo.transport.base import Connection, Frame, TransportOptions
from echo.transport.native.server import NativeTransport
from echo.transport.native.sockets import NativeConnection

pytestmark = [pytest.mark.unit, pytest.mark.anyio]

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_socket_error_code_is_documented_in_the_readme() -> None:
    bullet = README[README.index("- Error codes:"):]
    bullet = bullet[:bullet.index("\n- ")]
    documented = set(re.findall(r"`([a-z_]+)`", bullet)) - {"function", "kind", "retryAfterMs"}
    assert {code.value for code in ErrorCode} == documented


def test_every_function_error_kind_is_documented_in_the_readme() -> None:
    line = next(line for line in README.splitlines() if "with `kind` one of" in line
                or line.startswith("`raised`, `timeout`"))
    paragraph = README[README.index(line):README.index(line) + 400]
    documented = set(re.findall(r"`([a-z_]+)`", paragraph.split("(the runner")[0]))
    assert {kind.value for kind in FunctionErrorKind} <= documented


def test_error_body_is_one_shape_everywhere() -> None:
    assert protocol.error(ErrorCode.TOO_LARGE, "big", limit=5) == {
        "ok": False, "error": {"code": "too_large", "message": "big", "limit": 5}}
    assert protocol.ok(channels=["a"]) == {"ok": True, "channels": ["a"]}


@pytest.mark.parametrize(("data", "code", "words"), [
    (None, "bad_request", "expects an object"),
    ({"channels": []}, "bad_request", "non-empty list"),
    ({"channels": ["ok", 5]}, "bad_request", "subscribe.channels[1] must be a string"),
    ({"channels": ["no spaces"]}, "bad_channel", "'no spaces' is not a channel name"),
    ({"channels": ["a"] * 101}, "bad_request", "at most 100"),
    ({"channels": ["a"], "withPresence": "yes"}, "bad_request", "withPresence"),
])
def test_subscribe_payloads_are_refused_with_the_field_named(
        data: object, code: str, words: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        protocol.parse_subscribe(data)
    assert refused.value.code == code
    assert words in refused.value.message


def test_publish_payload_limits() -> None:
    assert protocol.parse_publish({"channel": "c", "message": {"a": 1}}, 100).message == {"a": 1}
    with pytest.raises(ProtocolError, match="is 112 bytes encoded; the limit is 100"):
        protocol.parse_publish({"channel": "c", "message": "x" * 110}, 100)
    with pytest.raises(ProtocolError, match="admin channel"):
        protocol.parse_publish({"channel": "admin", "message": 1}, 100)
    with pytest.raises(ProtocolError, match="cannot be relayed"):
        protocol.parse_publish({"channel": "c", "message": 2**70}, 100)


def test_status_payload_keeps_ekkos_shape_inside() -> None:
    status = protocol.status_payload("connection", "app", uuid="u", admin=True, extra=1)
    assert status["message"] == {"event": "connection", "app": "app", "uuid": "u", "admin": True}
    assert status["extra"] == 1 and isinstance(status["ts"], int)


def test_token_bucket_grants_a_burst_then_names_the_wait() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = bucket.take()
    assert 0.05 < wait <= 0.1
    time.sleep(wait)
    assert bucket.take() == 0.0


def test_connection_counts_refuse_past_the_limit_per_app() -> None:
    counts = ConnectionCounts(limit=2)
    counts.add("a")
    counts.add("a")
    problem = counts.problem("a")
    assert problem is not None and "has 2 connections on this node, the limit is 2" in problem
    assert counts.problem("b") is None
    counts.remove("a")
    assert counts.problem("a") is None
    counts.remove("a")
    counts.remove("a")
    assert counts.per_app == {}


@pytest.mark.parametrize(("raw", "value"), [
    (True, True), ("yes", True), ("ON", True), ("1", True), (False, False), ("off", False),
    ("0", False), (" no ", False)])
def test_one_boolean_parser(raw: object, value: bool) -> None:
    assert to_bool("x", raw) is value


def test_boolean_parser_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="ECHO_REDIS_CLUSTER: expected true or false, got 'maybe'"):
        to_bool("ECHO_REDIS_CLUSTER", "maybe")


def test_transport_and_redis_settings(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={
        "ECHO_TRANSPORT": "python-socketio", "ECHO_PING_INTERVAL": "0.25",
        "ECHO_REDIS_URL": "redis://a:1/0, redis://b:2/0", "ECHO_REDIS_CLUSTER": "true"})
    assert settings.transport == "python-socketio"
    assert settings.ping_interval == 0.25  # sub-second intervals are kept
    assert redis_urls(settings.redis_url or "") == ["redis://a:1/0", "redis://b:2/0"]
    assert settings.redis_cluster is True
    with pytest.raises(ConfigError, match="ECHO_TRANSPORT: 'sockjs' is not one of native, "
                                          "python-socketio"):
        load_settings(tmp_path, environ={"ECHO_TRANSPORT": "sockjs"})
    with pytest.raises(ConfigError, match="'http://b' is not a redis://"):
        load_settings(tmp_path, environ={"ECHO_REDIS_URL": "redis://a/0,http://b"})


def test_a_frame_is_encoded_once_and_decodes_to_what_was_sent() -> None:
    frame = Frame.event("/chat", "message", {"channel": "c", "message": "hé"})
    assert frame.packet == '2/chat,["message",{"channel":"c","message":"hé"}]'.encode()
    assert frame.decode() == ("/chat", "message", [{"channel": "c", "message": "hé"}])
    root = Frame.event("/", "ping", 1, 2)
    assert root.packet == b'2["ping",1,2]'
    assert root.decode() == ("/", "ping", [1, 2])
    with pytest.raises(TypeError):
        Frame.event("/chat", "bin", b"bytes")
    received = Frame(packet='2/chat,["message","hé"]'.encode())  # as the broker hands it over
    assert received.text == '2/chat,["message","hé"]'
    assert received.decode() == ("/chat", "message", ["hé"])
    with pytest.raises(TypeError):
        Frame()


class GatedBroker(MemoryBroker):
    """The memory broker, with subscribe held until the test lets it finish."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, str, str]] = []

    async def subscribe(self, app: str, channel: str) -> None:
        self.calls.append(("subscribe", app, channel))
        await self.gate.wait()

    async def unsubscribe(self, app: str, channel: str) -> None:
        self.calls.append(("unsubscribe", app, channel))


async def test_rooms_subscribe_a_node_once_and_later_joiners_wait_for_it() -> None:
    """The second joiner of a room is answered only once the node receives the channel;
    the last leaver unsubscribes the node."""
    broker = GatedBroker()
    transport = NativeTransport(NoHandler(), TransportOptions())
    rooms = Rooms(transport, broker)
    session = transport.new_session("polling")
    first, second = NativeConnection(session, "/app"), NativeConnection(session, "/app")
    joining = [asyncio.ensure_future(rooms.join(conn, "news")) for conn in (first, second)]
    await asyncio.sleep(0.01)
    assert broker.calls == [("subscribe", "app", "news")]
    assert not any(task.done() for task in joining)
    broker.gate.set()
    await asyncio.wait_for(asyncio.gather(*joining), 1)
    await rooms.leave(first, "news")
    assert broker.calls == [("subscribe", "app", "news")]
    await rooms.leave(second, "news")
    assert broker.calls[-1] == ("unsubscribe", "app", "news")
    await transport.close()


class NoHandler:
    async def connect(self, conn: Connection, auth: object) -> None:
        return None

    async def event(self, conn: Connection, event: str, args: list[object],
                    ack_id: int | None) -> None:
        return None

    async def disconnect(self, conn: Connection, reason: str) -> None:
        return None


async def test_memory_broker_delivers_at_once_and_keeps_presence() -> None:
    got: list[tuple[str, str, bytes]] = []
    broker = MemoryBroker()
    await broker.start(lambda app, channel, frame: got.append((app, channel, frame.packet)))
    broker.publish("app", "news", Frame(packet=b"2/app,[1]"))
    assert got == [("app", "news", b"2/app,[1]")]
    await broker.presence_add("app", "news", "sid1", {"uuid": "ada"})
    await broker.presence_add("app", "news", "sid2", {"uuid": "bob"})
    await broker.presence_remove("app", "news", "sid1")
    assert await broker.presence("app", "news") == {"sid2": {"uuid": "bob"}}
    await broker.presence_remove("app", "news", "sid2")
    assert await broker.presence("app", "news") == {}


async def test_memory_broker_reports_each_occupancy_turn_once() -> None:
    broker = MemoryBroker()
    await broker.presence_add("app", "news", "sid1", {})
    await broker.presence_add("app", "news", "sid2", {})
    turns = [await broker.occupancy_change("app", "news") for _ in range(2)]
    await broker.presence_remove("app", "news", "sid1")
    turns.append(await broker.occupancy_change("app", "news"))
    await broker.presence_remove("app", "news", "sid2")
    turns += [await broker.occupancy_change("app", "news") for _ in range(2)]
    assert turns == [True, None, None, False, None]


@pytest.mark.unit
def test_gc_pauses_are_timed_for_metrics() -> None:
    """Issue 19 measures the collector's pauses (gc.callbacks) in /metrics."""
    import gc

    from prometheus_client import generate_latest

    from echo.core import gc_pauses

    gc_pauses.install()
    gc_pauses.install()  # once only
    assert gc.callbacks.count(gc_pauses.RECORDER) == 1
    garbage = [[[] for _ in range(100)] for _ in range(2000)]
    del garbage
    gc.collect()
    text = generate_latest().decode()
    assert 'echo_gc_pause_seconds_count{generation="2"}' in text
    assert gc_pauses.RECORDER.longest[2] > 0
    assert 'echo_gc_pause_max_seconds{generation="2"}' in text
    cyclic = []
    for _ in range(50_000):  # work for the collector: cycles it has to find
        node: list[object] = []
        node.append(node)
        cyclic.append(node)
    del cyclic, node
    gc.collect()
    assert 0 < gc_pauses.RECORDER.most_work[2] <= gc_pauses.RECORDER.longest[2] + 0.001
    assert 'echo_gc_work_max_seconds{generation="2"}' in generate_latest().decode()

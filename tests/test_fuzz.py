"""Property-based fuzzing: any payload gets a clear answer, never a crash.

The parsers are fuzzed directly (thousands of cases, fast), then random payloads go to a
live server over a real connection, which must answer each with an ok or an error ack and
keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from echo.core.associations import AssociationsError, parse_associations
from echo.core.protocol import ProtocolError, parse_publish, parse_subscribe, parse_unsubscribe
from tests.conftest import Client, EchoProcess, connect

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)
channel_like = st.one_of(st.text(max_size=210), st.sampled_from(["plain", "admin", "a#presence",
                                                                 "room:1", ""]), json_values)
subscribe_like = st.one_of(
    json_values,
    st.fixed_dictionaries({"channels": st.lists(channel_like, max_size=4)},
                          optional={"withPresence": json_values}),
)
publish_like = st.one_of(
    json_values,
    st.fixed_dictionaries({"channel": channel_like}, optional={"message": json_values}),
)


@settings(max_examples=600, deadline=None)
@given(subscribe_like)
def test_subscribe_and_unsubscribe_parsers_never_crash(data: Any) -> None:
    for parse in (parse_subscribe, parse_unsubscribe):
        try:
            parse(data)
        except ProtocolError as exc:
            assert exc.code and exc.message


@settings(max_examples=600, deadline=None)
@given(publish_like)
def test_publish_parser_never_crashes(data: Any) -> None:
    try:
        request = parse_publish(data, 1024)
    except ProtocolError as exc:
        assert exc.code in {"bad_request", "bad_channel", "forbidden", "too_large"}
        assert exc.message
    else:
        assert request.channel == data["channel"]


associations_like = st.one_of(
    json_values,
    st.fixed_dictionaries({"applications": st.dictionaries(
        st.text(max_size=10),
        st.one_of(json_values, st.fixed_dictionaries({"channels": st.lists(st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"channelName": channel_like},
                optional={"functionNames": st.lists(st.text(max_size=12) | json_values,
                                                    max_size=3),
                          "ordered": json_values},
            ),
        ), max_size=4)})),
        max_size=3,
    )}),
)


@settings(max_examples=600, deadline=None)
@given(associations_like)
def test_associations_parser_never_crashes_and_names_a_path(data: Any) -> None:
    try:
        associations = parse_associations(data)
    except AssociationsError as exc:
        assert exc.problem
    else:
        for app in associations.apps:
            associations.match(app, "plain")


class LiveClient:
    """A connected client driven from synchronous hypothesis tests via a loop thread."""

    def __init__(self, server: EchoProcess) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client: Client = self.run(connect(server))

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def close(self) -> None:
        self.run(self.client.disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def live(echo_server: EchoProcess) -> Iterator[LiveClient]:
    client = LiveClient(echo_server)
    yield client
    client.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(event=st.sampled_from(["subscribe", "unsubscribe", "publish", "nonsense"]),
       payload=st.one_of(subscribe_like, publish_like))
def test_live_server_answers_every_random_payload(live: LiveClient, event: str,
                                                  payload: Any) -> None:
    reply = live.run(live.client.call(event, payload))
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool)
    if not reply["ok"]:
        assert reply["error"]["code"] and reply["error"]["message"]


def test_live_server_still_serves_after_the_fuzzing(live: LiveClient,
                                                    echo_server: EchoProcess) -> None:
    from tests.test_bad_input import assert_still_serving

    asyncio.run(assert_still_serving(echo_server))
    assert live.client.sio.connected


# -- raw Engine.IO / Socket.IO frames, over a real WebSocket -----------------------------

packet_types = st.sampled_from([*"0123456789", "", "x", "\x00"])
namespaces = st.sampled_from(["", "/test-app,", "/nope,", "//test-app,", "/" + "n" * 300 + ","])
frame_bodies = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.builds(lambda event, payload: json.dumps([event, payload]),
              st.sampled_from(["publish", "subscribe", "history", "presence", "x"]),
              st.one_of(publish_like, subscribe_like)),
)
raw_frames = st.one_of(
    st.builds(lambda engine, socketio, namespace, ack, body: f"{engine}{socketio}{namespace}{ack}{body}",
              packet_types, packet_types, namespaces,
              st.one_of(st.just(""), st.integers(0, 10**12).map(str)), frame_bodies),
    st.binary(max_size=300),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])
@given(frames=st.lists(raw_frames, min_size=1, max_size=6), authenticate=st.booleans())
def test_raw_frames_never_crash_the_server_or_reach_another_client(
        live: LiveClient, echo_server: EchoProcess, frames: list[Any], authenticate: bool) -> None:
    """Anything a socket may send, before or after its CONNECT: the session may be closed,
    the server never is, and a normal client on it still gets its answers."""
    import websockets

    async def send_all() -> None:
        url = f"ws://127.0.0.1:{echo_server.port}/socket.io/?EIO=4&transport=websocket"
        async with websockets.connect(url, open_timeout=5) as ws:
            await ws.recv()  # the Engine.IO open packet
            if authenticate:
                await ws.send("40/test-app," + json.dumps({"jwt": echo_server.token()}))
                await asyncio.wait_for(ws.recv(), 5)
            for frame in frames:
                try:
                    await ws.send(frame)
                except websockets.ConnectionClosed:
                    return  # the session was closed: allowed
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.recv(), 0.05)

    live.run(send_all())
    reply = live.run(live.client.call("publish", {"channel": "plain", "message": "still here"}))
    assert reply["ok"] is True, reply

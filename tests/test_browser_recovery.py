"""The browser client recovers by itself: a page goes offline (Playwright's
``context.set_offline``) while another page publishes on a history channel; when it comes
back it shows every message it missed, once, in order, and its state says ``recovered``.

Real Chromium, the real client (echo/client/echo.js as the server serves it).
"""

from __future__ import annotations

import uuid as uuids
from typing import Any

import pytest

from tests.conftest import TEST_APP, EchoProcess
from tests.test_browser_chat import WAIT_MS, browser  # noqa: F401 (the fixture)

pytestmark = pytest.mark.browser
WIRE_TESTS = True  # runs on both transports (conftest.py)

START = """async ([host, appName, jwt, channel]) => {
  const { Echo } = await import("/client/echo.js");
  window.received = [];
  window.states = [];
  const echo = new Echo({ host, appName, jwt });
  window.echo = echo;
  echo.addListener({
    message: (m) => window.received.push([m.offset, m.epoch, m.message.n]),
    state: (s) => window.states.push(s),
  });
  await new Promise((resolve) => echo.addListener({ state: (s) => s.state === "connected" && resolve() }));
  await echo.subscribe({ channels: [channel] });
}"""

PUBLISH = """async ([channel, from, to]) => {
  for (let n = from; n < to; n++) await window.echo.publish({ channel, message: { n } });
}"""


class Page:
    def __init__(self, chromium: Any, server: EchoProcess, channel: str) -> None:
        self.context = chromium.new_context()
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(server.url + "/client/echo.js")  # any page of the server's origin
        self.page.evaluate(START, [server.url, TEST_APP, server.token(), channel])

    def received(self) -> list[list[Any]]:
        return self.page.evaluate("window.received")  # type: ignore[no-any-return]

    def wait(self, condition: str) -> None:
        self.page.wait_for_function(condition, timeout=60_000)


def test_a_page_that_goes_offline_shows_every_missed_message_once(
        browser: Any, echo_server: EchoProcess) -> None:  # noqa: F811
    channel = "hist:browser-" + uuids.uuid4().hex[:8]
    reader = Page(browser, echo_server, channel)
    writer = Page(browser, echo_server, channel)
    try:
        writer.page.evaluate(PUBLISH, [channel, 0, 5])
        reader.wait("window.received.length === 5")
        reader.context.set_offline(True)
        reader.wait("window.states.some((s) => s.state === 'disconnected')")
        writer.page.evaluate(PUBLISH, [channel, 5, 40])
        reader.context.set_offline(False)
        reader.wait("window.states.some((s) => s.state === 'connected' && s.recovered)")
        reader.wait("window.received.length >= 40")
        writer.page.evaluate(PUBLISH, [channel, 40, 41])
        reader.wait("window.received.length >= 41")
        received = reader.received()
        assert [n for _, _, n in received] == list(range(41))
        assert [offset for offset, _, _ in received] == list(range(1, 42))
        assert len({epoch for _, epoch, _ in received}) == 1
        states = reader.page.evaluate("window.states")
        assert [s["recovered"] for s in states if s.get("recovered")] == [{channel: True}]
        assert reader.errors == [] and writer.errors == []
    finally:
        reader.context.close()
        writer.context.close()

"""The dev inspector in Chromium: publish from the page, see demo-angry's input, output,
duration and a print() from inside it; a raising function's traceback with the handler's
line; edit the handler and replay the recorded message through the new code. Also the JSON
and the live stream the page reads, and that ``serve`` has none of it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import EchoProcess, make_project
from tests.test_browser_chat import SCREENSHOTS, WAIT_MS, Person, browser  # noqa: F401 - the fixture

pytestmark = pytest.mark.browser

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the `browser` fixture
    expect = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EchoProcess]:
    project = make_project(tmp_path)
    handler = project / "functions" / "demo-angry" / "handler.py"
    handler.write_text(handler.read_text().replace(
        "def handler(event, context):\n", "def handler(event, context):\n"
        "    print('angry got', event)\n"))
    started = EchoProcess(project).start()
    yield started
    started.stop()


def publish(page: Any, app: str, channel: str, message: str) -> None:
    page.fill("#pub-app", app)
    page.fill("#pub-channel", channel)
    page.fill("#pub-message", message)
    page.click("#pub-send")


def test_the_inspector_shows_every_hop_errors_and_replays_after_an_edit(
        browser: Any, server: EchoProcess) -> None:  # noqa: F811
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    ada = Person(browser, server, "Ada", "🦊")  # a chat page: a subscriber of #angry
    try:
        page.goto(server.url + "/dev/inspector/")
        expect(page.locator("#live")).to_have_attribute("data-state", "live")
        expect(page.locator("#clients")).to_contain_text("🦊 Ada")
        expect(page.locator("#clients")).to_contain_text("#angry")
        publish(page, "chat-demo", "angry", '{"text": "hello"}')
        expect(page.locator("#pub-result")).to_contain_text("delivered")
        hop = page.locator('#detail .hop[data-function="demo-angry"]')
        expect(hop.locator(".hop-input")).to_contain_text('"text": "hello"')
        expect(hop.locator(".hop-output")).to_contain_text('"text": "HELLO!!!"')
        expect(hop.locator("h3 .ms")).to_contain_text(" ms")
        expect(hop.locator(".hop-logs")).to_contain_text("angry got {'text': 'hello'}")
        expect(page.locator("#detail .outcome")).to_contain_text("delivered to 1 subscriber")
        expect(ada.texts("angry").last).to_have_text("HELLO!!!")  # the page got it too
        angry = page.locator('#traces .trace[data-channel="angry"]').first.get_attribute("data-id")

        publish(page, "test-app", "raise", '{"text": "boom?"}')
        expect(page.locator("#pub-result")).to_contain_text("refused: function_error")
        page.locator('#traces .trace[data-channel="raise"]').first.click()
        failed = page.locator('#detail .hop[data-function="fail-raise"]')
        expect(failed.locator(".hop-error")).to_contain_text("raised: ValueError: boom from fail-raise")
        expect(failed.locator(".hop-at")).to_contain_text("fail-raise/handler.py, line 2")
        expect(failed.locator(".hop-traceback")).to_contain_text('raise ValueError("boom from fail-raise")')
        page.screenshot(path=str(SCREENSHOTS / "inspector-error.png"))

        handler = server.project / "functions" / "demo-angry" / "handler.py"
        handler.write_text(handler.read_text().replace('"!!!"', '"?!"'))
        deadline = time.monotonic() + 10
        while not any("demo-angry" in r["functions"]
                      for r in httpx.get(server.url + "/dev/reloads").json()["reloads"]):
            assert time.monotonic() < deadline, "demo-angry was not reloaded"
            time.sleep(0.1)
        expect(page.locator("#reloads")).to_contain_text("reloaded demo-angry")
        page.locator(f'#traces .trace[data-id="{angry}"]').click()
        page.click("#replay")
        result = page.locator("#replay-result")
        expect(result).to_contain_text("the output changed")
        expect(result.locator(".replay-before")).to_contain_text("HELLO!!!")
        expect(result.locator(".replay-after")).to_contain_text("HELLO?!")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "inspector.png"))
        assert errors == [] and ada.errors == []
    finally:
        ada.close()
        context.close()


def test_traces_as_json_and_a_stream_bounded_and_off_in_serve(tmp_path: Path,
                                                              server: EchoProcess) -> None:
    with httpx.stream("GET", server.url + "/dev/traces/stream", timeout=10) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith(": connected")
        httpx.post(server.url + "/dev/inspector/publish",
                   json={"app": "test-app", "channel": "chain", "message": {"text": "x"}})
        events = []
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["trace"]["outcome"] is not None:
                    break
    final = events[-1]["trace"]
    assert [h["function"] for h in final["hops"]] == ["tag-a", "tag-b"]
    assert final["outcome"]["delivered"] is True
    listed = httpx.get(server.url + "/dev/traces", params={"channel": "chain"}).json()["traces"]
    assert listed[0]["id"] == final["id"]
    for _ in range(320):  # a ring: the oldest go
        httpx.post(server.url + "/dev/inspector/publish",
                   json={"app": "test-app", "channel": "plain", "message": "y" * 20_000})
    kept = httpx.get(server.url + "/dev/traces").json()["traces"]
    assert len(kept) == 300 and kept[0]["input"]["truncated"] is True
    assert all(t["id"] != final["id"] for t in kept)
    bad = httpx.post(server.url + "/dev/traces/nope/replay")
    assert bad.status_code == 400 and "no recorded message" in bad.json()["error"]["message"]

    production = EchoProcess(make_project(tmp_path / "serve"), command="serve").start()
    try:
        for path in ("/dev/traces", "/dev/inspector/", "/dev/clients"):
            assert httpx.get(production.url + path).status_code == 404
    finally:
        production.stop()

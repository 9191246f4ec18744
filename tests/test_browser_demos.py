"""The live-map and admin demo apps in a real browser (Debian's Chromium via Playwright).

- live-map: positions published on one channel pass demo-nearby-filter (too far from Dam
  Square: dropped, so other people never see them) and demo-enrich-distance (distance,
  direction and nearest place added on the server).
- admin: with an admin token, the page shows the other pages connecting, subscribing and
  leaving, and a function's error as it happens.

Same rule as tests/test_browser_chat.py: skipped loudly without Chromium/Playwright, failed
on CI. Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import test_browser_chat
from tests.conftest import REPO, EchoProcess, make_project
from tests.test_browser_chat import SCREENSHOTS, WAIT_MS

pytestmark = pytest.mark.browser

expect = test_browser_chat.expect
browser = test_browser_chat.browser  # the same module-scoped Chromium (skips/fails the same way)

# apps/live-map/app.js's projection: 700 x 500 map units around Dam Square, 100 per km
CENTER = (52.3731, 4.8926)
MAP_WIDTH, MAP_HEIGHT, SCALE = 700, 500, 100
KM_PER_DEG_LAT = 111.32
KM_PER_DEG_LON = KM_PER_DEG_LAT * math.cos(math.radians(CENTER[0]))
ANNE_FRANK_HOUSE = (52.3752, 4.8840)  # 0.63 km W of Dam Square
NEMO = (52.3738, 4.9123)  # 1.34 km E
WHERE = re.compile(r"^\d+\.\d\d km (N|NE|E|SE|S|SW|W|NW) of Dam Square, near [A-Z][\w' ]+$")


def project_with_live_map(root: Path) -> Path:
    """The test project plus the repo's live-map app, exactly as associations.json has it."""
    project = make_project(root)
    document = json.loads((project / "associations.json").read_text())
    repo = json.loads((REPO / "associations.json").read_text())
    document["applications"]["live-map"] = repo["applications"]["live-map"]
    (project / "associations.json").write_text(json.dumps(document, indent=2))
    return project


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EchoProcess]:
    process = EchoProcess(project_with_live_map(tmp_path_factory.mktemp("demos"))).start()
    yield process
    process.stop()


class Page:
    """One browser context (its own sessionStorage, so its own uuid) on one demo page."""

    def __init__(self, browser: Any, server: EchoProcess, path: str, label: str) -> None:
        self.label = label
        self.closed = False
        self.context = browser.new_context(viewport={"width": 1180, "height": 860})
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.goto(server.url + path)
        expect(self.page.locator("#status")).to_have_attribute("data-state", "live")

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / name), full_page=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.context.close()


class MapPerson(Page):
    def __init__(self, browser: Any, server: EchoProcess, name: str) -> None:
        super().__init__(browser, server, "/apps/live-map/", name)
        self.name = name
        self.page.fill("#name", name)
        self.uuid: str = self.page.evaluate(
            "JSON.parse(sessionStorage.getItem('echo-live-map')).uuid")

    def click_map(self, lat: float, lon: float) -> None:
        """Click the map where (lat, lon) is drawn."""
        box = self.page.locator("#map").bounding_box()
        x = MAP_WIDTH / 2 + (lon - CENTER[1]) * KM_PER_DEG_LON * SCALE
        y = MAP_HEIGHT / 2 - (lat - CENTER[0]) * KM_PER_DEG_LAT * SCALE
        ratio = box["width"] / MAP_WIDTH
        self.page.locator("#map").click(position={"x": x * ratio, "y": y * ratio})

    def go_to(self, place: str) -> None:
        self.page.select_option("#place", label=place)
        self.page.click("#go")

    def log(self, kind: str) -> Any:
        return self.page.locator(f'#log li[data-kind="{kind}"]')

    def person(self, other: MapPerson) -> Any:
        return self.page.locator(f'#people li[data-uuid="{other.uuid}"]')

    def marker(self, other: MapPerson) -> Any:
        return self.page.locator(f'#markers .marker[data-uuid="{other.uuid}"]')


def test_live_map_drops_far_positions_and_enriches_near_ones(
    browser: Any, server: EchoProcess
) -> None:
    ada = MapPerson(browser, server, "Ada")
    bob = MapPerson(browser, server, "Bob")
    try:
        # too far: Schiphol (11 km, off the map) and a spot on the map outside the circle
        ada.go_to("Schiphol airport")
        expect(ada.log("filtered")).to_have_count(1)
        expect(ada.log("filtered").first).to_contain_text(
            "Schiphol airport was dropped by demo-nearby-filter")
        ada.click_map(CENTER[0] + 0.02, CENTER[1] - 0.04)  # ~3.4 km NW
        expect(ada.log("filtered")).to_have_count(2)
        expect(ada.page.locator("#ghosts .ghost")).not_to_have_count(0)  # only Ada sees where

        # Bob publishes after Ada's refused positions; the channel delivers in publish order,
        # so once Bob sees his own position, anything of Ada's would already be there
        bob.click_map(*NEMO)
        expect(bob.person(bob)).to_contain_text("1.34 km E of Dam Square, near NEMO Science Museum")
        expect(bob.marker(ada)).to_have_count(0)
        expect(bob.person(ada)).to_have_count(0)
        expect(bob.page.locator("#log li")).to_have_count(1)  # his own delivery only

        # near: everyone sees Ada, with what demo-enrich-distance added on the server
        ada.click_map(*ANNE_FRANK_HOUSE)
        for viewer in (ada, bob):
            expect(viewer.person(ada)).to_contain_text(
                "0.63 km W of Dam Square, near Anne Frank House")
            expect(viewer.marker(ada)).to_have_count(1)
            expect(viewer.person(bob)).to_contain_text("near NEMO Science Museum")
        expect(ada.log("delivered")).to_have_count(1)
        expect(ada.log("delivered")).to_contain_text("everyone sees 0.63 km W of Dam Square")
        for name in ("Dam Square", "Rijksmuseum", "Vondelpark"):
            ada.go_to(name)
        expect(ada.log("delivered")).to_have_count(3)  # Vondelpark is 2.3 km out: dropped
        expect(ada.log("filtered")).to_have_count(3)
        expect(ada.log("filtered").first).to_contain_text("Vondelpark was dropped")
        expect(bob.person(ada)).to_contain_text("near Rijksmuseum")
        expect(bob.person(ada).locator(".where")).to_have_text(WHERE)
        ada.screenshot("live-map-ada.png")
        bob.screenshot("live-map-bob.png")

        # the marker sits where Ada is, labelled with what the server added
        ada.go_to("Anne Frank House")
        expect(bob.person(ada)).to_contain_text("near Anne Frank House")
        expect(bob.marker(ada).locator("title")).to_have_text(
            "Ada: 0.63 km W of Dam Square, near Anne Frank House")

        # Ada closes her page: presence takes her off Bob's map
        ada.close()
        expect(bob.marker(ada)).to_have_count(0)
        expect(bob.person(ada)).to_have_count(0)
        expect(bob.person(bob)).to_have_count(1)
        assert ada.errors == [] and bob.errors == [], (ada.errors, bob.errors)
    finally:
        ada.close()
        bob.close()


def test_admin_page_shows_pages_connecting_and_function_errors(
    browser: Any, server: EchoProcess
) -> None:
    admin = Page(browser, server, "/apps/admin/?app=live-map", "admin")
    ada = bob = None
    try:
        expect(admin.page.locator("h1")).to_contain_text("live-map")
        me = admin.page.locator("#clients tbody tr", has_text="this page")
        expect(me).to_have_attribute("data-state", "online")
        expect(me).to_contain_text("admin")

        ada = MapPerson(browser, server, "Ada")
        bob = MapPerson(browser, server, "Bob")
        for person in (ada, bob):
            row = admin.page.locator(f'#clients tbody tr[data-uuid="{person.uuid}"]')
            expect(row).to_have_attribute("data-state", "online")
            expect(row.locator(".role")).to_have_text("user")
            expect(row.locator(".channels-cell")).to_have_text("positions")
        expect(admin.page.locator("#client-count")).to_have_text("3 connected")
        for event in ("connection", "subscribe"):  # Ada's and Bob's (an admin is not sent
            # its own connection status, as in Ekko: the page counts itself)
            expect(admin.page.locator(f'#feed li[data-event="{event}"]')).to_have_count(2)

        # a bad position: demo-nearby-filter raises; Ada is told, the admin page shows it
        ada.page.click("#broken")
        expect(ada.log("error")).to_contain_text("function_error")
        expect(ada.log("error")).to_contain_text("not a position")
        failure = admin.page.locator('#errors tbody tr[data-function="demo-nearby-filter"]')
        expect(failure).to_have_attribute("data-kind", "raised")
        expect(failure).to_contain_text("ValueError: not a position")
        expect(failure.locator(".num").first).to_have_text("1")
        expect(failure.locator(".num").last).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
        expect(admin.page.locator("#error-count")).to_have_text("1")
        feed_error = admin.page.locator('#feed li[data-event="function_error"]')
        expect(feed_error).to_contain_text("demo-nearby-filter raised on #positions")
        expect(bob.page.locator("#log li")).to_have_count(0)  # Bob never heard of it

        # Bob leaves
        bob.close()
        gone = admin.page.locator(f'#clients tbody tr[data-uuid="{bob.uuid}"]')
        expect(gone).to_have_attribute("data-state", "offline")
        expect(gone.locator(".time")).to_contain_text("left")
        expect(admin.page.locator("#client-count")).to_have_text("2 connected")
        admin.screenshot("admin-live-map.png")
        assert admin.errors == [] and ada.errors == [], (admin.errors, ada.errors)
    finally:
        admin.close()
        for person in (ada, bob):
            if person is not None:
                person.close()

"""The web dashboard in a real browser: Debian's Chromium, headless, through
Playwright. The browser only talks to the in-process server on 127.0.0.1.

Screenshots go to test-artifacts/ at the repository root (or the directory
in CAIRN_TEST_ARTIFACTS) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, Route, sync_playwright

from engine.api.app import create_app
from engine.migrate import upgrade
from engine.registry import Registry
from tests.images import Image, encode, make_artifact, make_image, make_index
from tests.server import ServerThread, push_image, running

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(
    os.environ.get(
        "CAIRN_TEST_ARTIFACTS",
        Path(__file__).resolve().parent.parent / "test-artifacts",
    )
)
HOSTILE = (
    '<script>window.__injected = 1</script><img src=x onerror="window.__injected = 2">'
)
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    registry = Registry.open(tmp_path / "data")
    upgrade(registry.database)
    with running(create_app(registry)) as served:
        yield served
    registry.database.dispose()


@pytest.fixture
def browser_page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        blocked: list[str] = []

        def only_loopback(route: Route) -> None:
            # Every request the dashboard makes must go to the test server.
            url = route.request.url
            if url.startswith("http://127.0.0.1:"):
                route.continue_()
            else:
                blocked.append(url)
                route.abort()

        page.route("**/*", only_loopback)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        yield page
        browser.close()
        assert blocked == []
        assert errors == []


def _push_content(url: str) -> dict[str, Page]:
    """Push two images, an index and a signature with hostile annotations."""
    first = make_image(layer_size=4096)
    second = make_image(layer_size=2048)
    with httpx.Client(base_url=url, timeout=60) as client:
        push_image(client, "library/app", first, "v1")
        push_image(client, "library/app", second, "v2")
        push_image(client, "library/app", second, "v1")
        index = make_index([first, second])
        response = client.put(
            "/v2/library/app/manifests/multi",
            content=index,
            headers={"Content-Type": "application/vnd.oci.image.index.v1+json"},
        )
        assert response.status_code == 201
        signature = make_artifact(first, "application/vnd.example.sig", b"sig")
        document = json.loads(signature.manifest)
        document["annotations"] = {"org.example.note": HOSTILE}
        push_image(
            client,
            "library/app",
            Image(signature.config, signature.layers, encode(document)),
        )
        push_image(client, "tools/builder", make_image(), "latest")
        summary = client.get("/_cairn/api/v1/repositories/library/app").json()
        totals = client.get("/_cairn/api/v1/activity").json()["totals"]
    return {"summary": summary, "totals": totals}


def _wait_loaded(page: Page) -> None:
    page.wait_for_selector("body[data-loaded]", timeout=TIMEOUT_MS)
    assert page.get_attribute("body", "data-loaded") == "true"


def _screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_overview_shows_activity(server: ServerThread, browser_page: Page) -> None:
    pushed = _push_content(server.url)
    page = browser_page

    page.goto(f"{server.url}/_cairn/ui/")
    _wait_loaded(page)

    totals = pushed["totals"]
    assert isinstance(totals, dict)
    assert page.text_content("#total-pushes .value") == str(totals["pushes"])
    assert page.text_content("#total-events .value") == str(totals["events"])
    bars = page.eval_on_selector_all(
        "#activity-chart rect.push-bar",
        "nodes => nodes.map(n => Number(n.dataset.pushes)).reduce((a, b) => a + b, 0)",
    )
    assert bars == totals["pushes"]
    byte_ticks = page.eval_on_selector_all(
        "#activity-chart text.byte-tick", "nodes => nodes.map(n => n.textContent)"
    )
    assert len(byte_ticks) == 5
    # Each step of the byte axis is a whole number of one binary unit.
    for tick in byte_ticks[1:]:
        assert re.fullmatch(r"[0-9]+(\.0)? (B|KiB|MiB|GiB|TiB)", tick), byte_ticks
    names = page.eval_on_selector_all(
        "#repositories a.repository", "nodes => nodes.map(n => n.textContent)"
    )
    assert names == ["library/app", "tools/builder"]
    largest = page.text_content("#top-size tbody tr:first-child a")
    assert largest == "library/app"
    event_rows = page.locator("#events tbody tr").count()
    assert event_rows == min(25, totals["events"])
    assert _screenshot(page, "dashboard-overview.png").stat().st_size > 0


def test_repository_page_escapes_annotations(
    server: ServerThread, browser_page: Page
) -> None:
    pushed = _push_content(server.url)
    summary = pushed["summary"]
    assert isinstance(summary, dict)
    page = browser_page

    page.goto(f"{server.url}/_cairn/ui/repository.html?name=library/app")
    _wait_loaded(page)

    assert page.text_content("#title") == "library/app"
    assert page.text_content("#tag-count .value") == str(summary["tag_count"])
    assert page.text_content("#manifest-count .value") == str(summary["manifest_count"])
    tags = page.eval_on_selector_all(
        "#tags a.tag", "nodes => nodes.map(n => n.textContent)"
    )
    assert tags == ["multi", "v1", "v2"]
    assert "linux/arch0" in page.text_content("#tags")
    assert page.locator("#timeline rect.segment").count() == 4

    referrers = page.text_content("#referrers")
    assert HOSTILE in referrers
    assert page.evaluate("window.__injected") is None
    assert page.locator("main script, main img").count() == 0
    assert _screenshot(page, "dashboard-repository.png").stat().st_size > 0


def test_repository_page_notes_first_page(
    server: ServerThread, browser_page: Page
) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        image = make_image()
        push_image(client, "many/tags", image, "t000")
        for number in range(1, 205):
            response = client.put(
                f"/v2/many/tags/manifests/t{number:03d}",
                content=image.manifest,
                headers={"Content-Type": image.media_type},
            )
            assert response.status_code == 201, response.text
    page = browser_page

    page.goto(f"{server.url}/_cairn/ui/repository.html?name=many/tags")
    _wait_loaded(page)

    assert page.text_content("#tag-count .value") == "205"
    assert page.locator("#tags tbody tr").count() == 200
    caption = page.text_content("#tags caption")
    assert caption is not None
    assert caption.startswith("Showing the first 200 tags;")
    assert page.locator("#manifests caption").count() == 0
    # The timeline draws the 20 most recently set tags, t185 to t204.
    assert page.text_content("#timeline p.more") == (
        "Showing the 20 most recently set of 205 tags."
    )
    legends = page.eval_on_selector_all(
        "#timeline text.legend", "nodes => nodes.map(n => n.textContent)"
    )
    labels = sorted(text for text in legends if re.fullmatch(r"t[0-9]{3}", text))
    assert labels == [f"t{number:03d}" for number in range(185, 205)]
    assert page.locator("#timeline rect.segment").count() == 20


def test_tag_page_shows_history(server: ServerThread, browser_page: Page) -> None:
    _push_content(server.url)
    history = httpx.get(
        f"{server.url}/_cairn/api/v1/repositories/library/app/-/tags/v1/history"
    ).json()["history"]
    page = browser_page

    page.goto(f"{server.url}/_cairn/ui/tag.html?name=library/app&tag=v1")
    _wait_loaded(page)

    assert page.text_content("#title") == "library/app:v1"
    assert page.text_content("#change-count .value") == "2"
    assert page.locator("#history tbody tr").count() == 2
    assert page.locator("#timeline rect.segment").count() == 2

    page.click("#at-form button")
    page.wait_for_selector("#at-result:not(:empty)", timeout=TIMEOUT_MS)
    assert f"pointed to {history[0]['digest']}" in page.text_content("#at-result")
    shot = _screenshot(page, "dashboard-tag.png")

    page.fill("#at", "2000-01-01T00:00:00")
    page.click("#at-form button")
    page.wait_for_selector("#at-result:text('Not set then')", timeout=TIMEOUT_MS)
    assert "MANIFEST_UNKNOWN" in page.text_content("#at-result")
    assert shot.stat().st_size > 0


def test_long_tag_history_counted_and_noted(
    server: ServerThread, browser_page: Page
) -> None:
    # The tag page reads one page of 1000 changes, the largest the query API
    # serves, and the repository timeline 200 per tag.
    changes = 1003
    images = [make_image(), make_image()]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for image in images:
            push_image(client, "demo/flip", image, "flip")
        for number in range(changes - len(images)):
            image = images[number % 2]
            response = client.put(
                "/v2/demo/flip/manifests/flip",
                content=image.manifest,
                headers={"Content-Type": image.media_type},
            )
            assert response.status_code == 201, response.text
    current = images[(changes - 1) % 2]
    page = browser_page

    page.goto(f"{server.url}/_cairn/ui/tag.html?name=demo/flip&tag=flip")
    _wait_loaded(page)

    assert page.text_content("#change-count .value") == str(changes)
    expected_digest = str(current.digest).split(":")[1][:12]
    assert page.text_content("#current-digest .value") == f"sha256:{expected_digest}"
    assert page.locator("#history tbody tr").count() == 1000
    caption = page.text_content("#history caption")
    assert caption == (
        f"Showing the latest 1000 of {changes} changes; "
        "the query API pages through the rest."
    )
    assert page.text_content("#timeline p.more") == (
        f"Showing the latest 1000 of {changes} changes of flip."
    )
    assert page.locator("#timeline rect.segment").count() == 1000
    _screenshot(page, "dashboard-tag-long-history.png")

    page.goto(f"{server.url}/_cairn/ui/repository.html?name=demo/flip")
    _wait_loaded(page)

    assert page.text_content("#timeline p.more") == (
        f"Showing the latest 200 of {changes} changes of flip."
    )
    assert page.locator("#timeline rect.segment").count() == 200
    events_caption = page.text_content("#events caption")
    assert events_caption is not None
    assert events_caption.startswith("Showing the latest 25 events;")

"""A web app on another origin uploads straight to the API from a real browser (issue #9).

Debian's chromium (Playwright) loads tests/pages/upload.html from the site's origin; the page
holds an upload token the test minted with the API key (never the key), uploads with the
vendored tus-js-client, survives a connection cut mid-body, follows the conversion with an
EventSource on a signed URL and draws the result on a canvas, which only works when every
answer carried the right CORS headers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from playwright.sync_api import TimeoutError as PlaywrightTimeout

from core.settings import Settings
from tests.browser import (
    DirectApi,
    MiB,
    StaticSite,
    Tab,
    mint_token,
    path_of,
    upload_offset,
    wait_until,
)
from tests.integration.conftest import ConfigureJobs, SiteFile

PAGE = "/pages/upload.html"
TUS_REQUEST_HEADERS = "authorization,tus-resumable,upload-length,upload-metadata"


def state(tab: Tab) -> dict[str, Any]:
    value = tab.call("state")
    assert isinstance(value, dict)
    return value


def wait_for_upload(tab: Tab, timeout: float = 120) -> dict[str, Any]:
    """The page's upload state once it succeeded or failed for good."""
    try:
        tab.wait_for("window.client.state().done || window.client.state().error", timeout)
    except PlaywrightTimeout:
        raise AssertionError(f"the upload did not end within {timeout} s: {state(tab)}") from None
    return state(tab)


def test_the_page_loads_tus_js_client_from_the_other_origin(
    browser_page: Tab, site: StaticSite
) -> None:
    browser_page.open(site.url(PAGE))
    assert browser_page.page.evaluate("typeof tus.Upload === 'function' && tus.isSupported")
    assert browser_page.errors() == []


def test_a_browser_uploads_64_mib_through_a_cut_and_shows_the_converted_image(
    browser_page: Tab,
    site: StaticSite,
    big_tiff: SiteFile,
    start_direct_api: Callable[..., DirectApi],
    configure_jobs: ConfigureJobs,
    run_jobs: Callable[[], None],
    env: dict[str, str],
    browser_profiles: Path,
) -> None:
    configure_jobs(Settings.from_env({**env, "PICSTREAM_PROFILES": str(browser_profiles)}))
    direct = start_direct_api(wired=True)
    wire = direct.wire
    assert wire is not None
    token = mint_token(direct.api)
    tab = browser_page
    tab.open(site.url(PAGE))
    third = big_tiff.size // 3

    size = tab.call(
        "start",
        {
            "endpoint": f"{direct.base}/v1/tus",
            "token": token,
            "file": f"/files/{big_tiff.name}",
            "chunkSize": 8 * MiB,
            "metadata": {
                "filename": "big.tiff",
                "filetype": "image/tiff",
                "id": "from-a-browser",
                "profile": "thumbs",
            },
            "holdAt": third,
        },
    )
    assert size == big_tiff.size

    # The page holds its first PATCH past a third; the server has the bytes before it.
    tab.wait_for("window.client.state().held || window.client.state().error")
    held = state(tab)
    assert held["error"] is None, held
    upload = path_of(held["uploadUrl"])
    wait_until(
        lambda: upload_offset(direct.api, upload, token) >= third, "the server's offset past 1/3"
    )

    # 2 MiB into the next PATCH's body every connection is cut, and refused until the page
    # has come back at least once; then the page resumes on its own.
    wire.arm(2 * MiB)
    tab.call("release")
    assert wire.tripped.wait(60), "the upload never reached the wire's trip point"
    assert wire.refused.wait(60), "the page never tried again while the API was unreachable"
    wire.restore()
    done = wait_for_upload(tab)
    assert done["error"] is None and done["done"], done
    assert done["retries"], "the cut went unnoticed by the page"
    assert done["image"] == "/v1/images/from-a-browser"

    resp = direct.api.request("GET", "/v1/images/from-a-browser?signed=600")
    assert resp.status == 200, resp.body
    record = resp.json
    assert (record["blake3"], record["size"]) == (big_tiff.blake3, big_tiff.size)
    assert (record["format"], record["width"], record["height"]) == ("tiff", 4096, 5461)
    assert (record["filename"], record["profile"]) == ("big.tiff", "thumbs")

    # EventSource on the signed link follows the conversion to `ready`.
    tab.call("follow", record["events_signed_url"])
    tab.wait_for("window.client.events.seen.length > 0 || window.client.events.failed")
    run_jobs()
    tab.wait_for("window.client.events.final || window.client.events.failed")
    events = tab.page.evaluate("window.client.events")
    assert events["failed"] is None, events
    assert events["seen"][0] == "processing" and events["seen"][-1] == "ready", events

    # The best variant for 300 px (the 512 px one) shows and reads back from a canvas.
    drawn = tab.call("draw", record["best_signed_url"] + "&width=300")
    assert (drawn["width"], drawn["height"]) == (512, round(5461 * 512 / 4096)), drawn
    assert drawn["data"] > len("data:image/png;base64,")


def forged(token: str) -> str:
    """The token with its signature's last character changed."""
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def test_a_wrong_or_absent_token_shows_the_problem_in_the_page(
    browser_page: Tab,
    site: StaticSite,
    tiny_png: SiteFile,
    start_direct_api: Callable[..., DirectApi],
) -> None:
    direct = start_direct_api()
    wrong = forged(mint_token(direct.api))
    for token in (wrong, None):
        browser_page.open(site.url(PAGE))
        browser_page.call(
            "start",
            {
                "endpoint": f"{direct.base}/v1/tus",
                "token": token,
                "file": f"/files/{tiny_png.name}",
                "chunkSize": MiB,
                "metadata": {"filename": "tiny.png", "filetype": "image/png"},
                "holdAt": None,
            },
        )
        failed = wait_for_upload(browser_page)
        problem = failed["error"]
        assert problem is not None and not failed["done"], failed
        # What the page reads is the problem the API answers to the same request.
        expected = direct.client(token).request(
            "POST",
            "/v1/tus",
            headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(tiny_png.size)},
        )
        assert (problem["status"], expected.status) == (401, 401)
        assert isinstance(problem["body"], dict), problem
        assert problem["body"]["detail"] == expected.json["detail"]
        assert problem["body"]["type"] == expected.json["type"]


def test_a_preflight_from_an_origin_not_listed_fails_in_the_browser(
    browser_page: Tab,
    site: StaticSite,
    site_files: Path,
    start_direct_api: Callable[..., DirectApi],
) -> None:
    direct = start_direct_api()
    token = mint_token(direct.api, uploads=2)
    create = {
        "method": "POST",
        "headers": {
            "Authorization": f"Bearer {token}",
            "Tus-Resumable": "1.0.0",
            "Upload-Length": "100",
        },
    }
    foreign = StaticSite(site_files)  # same pages, another port: another origin
    try:
        browser_page.open(foreign.url(PAGE))
        refused = browser_page.call("fetch", f"{direct.base}/v1/tus", create)
        assert "error" in refused, refused  # a TypeError: the preflight was refused
        preflight = direct.api.request(
            "OPTIONS",
            "/v1/tus",
            headers={
                "Origin": foreign.origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": TUS_REQUEST_HEADERS,
            },
            key=None,
        )
        assert preflight.header("access-control-allow-origin") is None, preflight.headers
    finally:
        foreign.stop()

    # The same request from the listed origin goes through.
    browser_page.open(site.url(PAGE))
    allowed = browser_page.call("fetch", f"{direct.base}/v1/tus", create)
    assert allowed.get("status") == 201, allowed

"""The web console (issue #10) in a real browser against the stack's real shape: Debian's
chromium (Playwright) opens `/` on nginx (deploy/nginx.conf) in front of gunicorn, and a
real `python -m worker` process converts what the page uploads while the page watches.

The page is driven as a person would: labels, roles and buttons, files through the file
input, the network cut with `context.set_offline`. What it claims is checked against the API.

`CONSOLE_SCREENSHOTS=docs .venv/bin/pytest tests/integration/test_console.py -k screenshots`
rewrites docs/console-gallery.png and docs/console-image.png; without it the screenshots
go to the test's tmp_path.
"""

from __future__ import annotations

import io
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pillow_heif
import pytest
from PIL import Image, ImageDraw, ImageFilter
from playwright.sync_api import Locator, Page, expect

from api.console import FILES
from core.storage import Store
from tests import pixels, servers
from tests.browser import Tab, file_blake3, wait_until, write_rgb_tiff
from tests.http import Api
from tests.integration.conftest import ALICE_KEY

pillow_heif.register_heif_opener()

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "api" / "static"
TIMES = "\N{MULTIPLICATION SIGN}"  # how the page writes 1200 x 800
TIMEOUT_MS = 90_000  # a conversion of the default profile (AVIF, WebP, JPEG) per image


# ---------------------------------------------------------------------------- images


def scene(width: int, height: int, palette: int) -> Image.Image:
    """A small landscape (sky, sun, three ranges of hills), so the screenshots show
    pictures rather than test patterns. `palette` picks the time of day."""
    skies = [
        ((255, 183, 94), (88, 65, 158)),  # dusk
        ((142, 202, 255), (30, 96, 200)),  # noon
        ((255, 214, 170), (240, 110, 90)),  # sunrise
        ((40, 48, 90), (8, 10, 30)),  # night
        ((190, 235, 230), (70, 160, 170)),  # haze
    ]
    hills = [
        ((70, 44, 110), (44, 28, 72), (24, 14, 40)),
        ((96, 170, 92), (58, 128, 70), (30, 84, 48)),
        ((196, 96, 90), (140, 62, 70), (80, 34, 48)),
        ((36, 52, 96), (24, 34, 66), (12, 16, 34)),
        ((60, 130, 120), (34, 96, 92), (18, 60, 60)),
    ]
    top, bottom = skies[palette % len(skies)]
    im = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(im)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line(
            [(0, y), (width, y)],
            fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    sun_x, sun_y, r = width * (0.25 + 0.12 * palette), height * 0.38, height * 0.1
    draw.ellipse([sun_x - r, sun_y - r, sun_x + r, sun_y + r], fill=(255, 244, 214))
    for i, colour in enumerate(hills[palette % len(hills)]):
        base = height * (0.55 + 0.14 * i)
        points = [(0, height)]
        for x in range(0, width + 40, 40):
            wave = math.sin(x / width * (3 + i) * math.pi + palette + i) * height * 0.06
            points.append((x, base + wave))
        points.append((width, height))
        draw.polygon(points, fill=colour)
    return im.filter(ImageFilter.GaussianBlur(1))


def jpeg_rotated(width: int, height: int, palette: int = 0) -> bytes:
    """A JPEG stored on its side with EXIF orientation 6: displayed `width` x `height`."""
    stored = pixels.stored_with_orientation(scene(width, height, palette), 6)
    return pixels.save(stored, "JPEG", quality=88, exif=pixels.exif_bytes(6))


def png_alpha(size: int) -> bytes:
    """A badge on a transparent background (alpha kept in AVIF/WebP, flattened in JPEG)."""
    im = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.ellipse([size * 0.08, size * 0.08, size * 0.92, size * 0.92], fill=(47, 91, 211, 255))
    draw.ellipse([size * 0.3, size * 0.3, size * 0.7, size * 0.7], fill=(255, 191, 71, 230))
    draw.rectangle([size * 0.46, size * 0.02, size * 0.54, size * 0.98], fill=(255, 255, 255, 140))
    return pixels.save(im, "PNG")


def heic(width: int, height: int, palette: int = 2) -> bytes:
    buf = io.BytesIO()
    scene(width, height, palette).save(buf, "HEIF", quality=80)
    return buf.getvalue()


@dataclass(frozen=True)
class Sample:
    path: Path
    format: str
    width: int
    height: int


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    """The three files a person drops: a phone JPEG on its side, a PNG with alpha, a HEIC."""
    folder = tmp_path_factory.mktemp("console-files")
    made = {
        "IMG_2041.jpg": (jpeg_rotated(1200, 800, 0), "jpeg", 1200, 800),
        "badge.png": (png_alpha(600), "png", 600, 600),
        "harbour.heic": (heic(960, 640, 2), "heic", 960, 640),
    }
    out = {}
    for name, (data, fmt, width, height) in made.items():
        path = folder / name
        path.write_bytes(data)
        out[name] = Sample(path, fmt, width, height)
    return out


# ---------------------------------------------------------------------------- the stack


@pytest.fixture()
def worker(env: dict[str, str], workdir: Path) -> Iterator[servers.Server]:
    """A real `python -m worker` on the session's Redis and store (stopped after the test)."""
    server = servers.start_worker(env, workdir / "console-workers", "console-worker")
    yield server
    server.stop()


@dataclass
class Console:
    """The console in a browser tab, opened on nginx's origin, and the API behind it."""

    tab: Tab
    base: str
    api: Api

    @property
    def page(self) -> Page:
        return self.tab.page

    def open(self, fragment: str = "") -> None:
        self.page.goto(f"{self.base}/{fragment}")
        expect(self.page.locator("h1").first).to_be_attached()

    def sign_in(self, key: str = ALICE_KEY) -> None:
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="Upload")).to_be_visible()

    def choose(self, *paths: Path) -> None:
        self.page.locator("#file-input").set_input_files([str(p) for p in paths])

    def row(self, filename: str) -> Locator:
        return self.page.locator("li.upload").filter(
            has=self.page.locator(".upload-name", has_text=filename)
        )

    def card(self, image_id: str) -> Locator:
        return self.page.locator(f'li.card[data-id="{image_id}"]')

    def image_id_of(self, filename: str) -> str:
        href = self.row(filename).get_by_role("link", name=f"Open {filename}").get_attribute("href")
        assert href is not None and href.startswith("#/images/"), href
        return href.removeprefix("#/images/")

    def record(self, image_id: str) -> dict[str, Any]:
        resp = self.api.request("GET", f"/v1/images/{image_id}")
        assert resp.status == 200, (resp.status, resp.body)
        record: dict[str, Any] = resp.json
        return record


@pytest.fixture()
def console(nginx: servers.Front, browser_page: Tab) -> Console:
    return Console(
        browser_page, f"http://127.0.0.1:{nginx.port}", Api("127.0.0.1", nginx.port, ALICE_KEY)
    )


def wider_than_the_screen(page: Page) -> list[str]:
    """Elements that stick out of the viewport sideways (a phone would scroll sideways)."""
    found: list[str] = page.evaluate(
        """() => [...document.querySelectorAll("body *")]
          .filter((el) => el.getBoundingClientRect().right > innerWidth + 0.5)
          .filter((el) => !el.closest(".table-scroll, textarea, .visually-hidden"))
          .map((el) => {
            const right = Math.round(el.getBoundingClientRect().right);
            return `${el.tagName.toLowerCase()}.${el.className} ${right}`;
          })"""
    )
    return found


def shot_dir(tmp_path: Path) -> Path:
    target = os.environ.get("CONSOLE_SCREENSHOTS")
    return ROOT / target if target else tmp_path


# ---------------------------------------------------------------------------- serving


def test_every_console_file_is_served_and_nothing_else() -> None:
    """api/console.py lists each file of api/static/console/ (a new file is not forgotten)
    and names only files that exist."""
    on_disk = {f"static/console/{p.name}" for p in (STATIC / "console").iterdir()}
    listed = set(FILES.values())
    assert on_disk <= listed, on_disk - listed
    for name in listed:
        assert (ROOT / "api" / name).is_file(), name


def test_the_page_and_its_files_come_without_a_key_and_with_their_headers(
    nginx: servers.Front,
) -> None:
    api = Api("127.0.0.1", nginx.port, None)
    page = api.request("GET", "/")
    assert page.status == 200, page.body
    assert page.header("content-type") == "text/html; charset=utf-8"
    assert page.header("x-content-type-options") == "nosniff"
    assert page.header("cache-control") == "no-cache"
    csp = page.header("content-security-policy") or ""
    for directive in (
        "default-src 'self'",
        "script-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in csp, csp
    assert "unsafe" not in csp
    assert b"<script>" not in page.body and b"style=" not in page.body  # no inline code
    etag = page.header("etag")
    assert etag
    assert api.request("GET", "/", headers={"If-None-Match": etag}).status == 304
    head = api.request("HEAD", "/")
    assert (head.status, head.body) == (200, b"")
    assert head.header("content-length") == str(len(page.body))

    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for path in FILES:
        if path == "/":
            continue
        resp = api.request("GET", path)
        assert resp.status == 200, (path, resp.status)
        assert resp.header("content-type") == types[Path(path).suffix], path
        assert resp.header("x-content-type-options") == "nosniff", path
        assert resp.body == (ROOT / "api" / FILES[path]).read_bytes(), path

    # Only the listed files: anything else under /console/ is a 404, other methods a 405,
    # and the API still wants its key.
    assert api.request("GET", "/console/nope.js").status == 404
    assert api.request("GET", "/console/vendor/README.md").status == 404
    assert api.request("POST", "/", b"x").status == 405
    assert api.request("GET", "/v1/images").status == 401


# ---------------------------------------------------------------------------- signing in


def test_a_wrong_key_shows_the_401_detail_and_the_right_one_is_kept_for_the_tab_only(
    console: Console,
) -> None:
    console.open()
    page = console.page
    page.get_by_label("API key").fill("not-a-key-0123456789")
    page.get_by_role("button", name="Sign in").click()
    expected = console.api.request("GET", "/v1/images", key="not-a-key-0123456789").json
    expect(page.get_by_role("alert")).to_have_text(expected["detail"])

    console.sign_in()
    assert page.evaluate("sessionStorage.getItem('picstream.apiKey')") == ALICE_KEY
    assert ALICE_KEY not in page.evaluate("JSON.stringify(localStorage)")
    assert ALICE_KEY not in page.evaluate("document.cookie")
    expect(page.get_by_text("No images yet")).to_be_visible()
    # The one error the browser logged is the wrong key's 401.
    assert [e for e in console.tab.errors() if "status of 401" not in e] == []

    page.reload()  # the same tab keeps it
    expect(page.get_by_role("heading", name="Upload")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API key")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('picstream.apiKey')") is None


# ---------------------------------------------------------------------------- the whole flow


def test_three_files_upload_convert_live_and_the_image_page_works(
    console: Console,
    samples: dict[str, Sample],
    worker: servers.Server,
    tmp_path: Path,
) -> None:
    page = console.page
    console.tab.context.grant_permissions(["clipboard-read", "clipboard-write"])
    streams: list[str] = []
    tokens_minted: list[str] = []
    page.on("request", lambda r: streams.append(r.url) if "/events?" in r.url else None)
    page.on(
        "request",
        lambda r: tokens_minted.append(r.url) if r.url.endswith("/v1/upload-tokens") else None,
    )
    uploads_with_key: list[str] = []

    def check_tus(request: Any) -> None:
        if "/v1/tus" in request.url and request.headers.get("authorization", "").endswith(
            ALICE_KEY
        ):
            uploads_with_key.append(request.url)

    page.on("request", check_tus)
    console.open()
    console.sign_in()
    console.choose(*(s.path for s in samples.values()))

    # Each reaches 100 %, then `ready`, told by its event stream.
    for name in samples:
        row = console.row(name)
        expect(row.get_by_role("progressbar")).to_have_attribute(
            "aria-valuenow", "100", timeout=TIMEOUT_MS
        )
        expect(row).to_have_attribute("data-state", "ready", timeout=TIMEOUT_MS)
        expect(row.locator(".chip").first).to_be_visible()
        assert row.locator('.chip[data-status="ready"]').count() == row.locator(".chip").count()
    assert len(streams) >= 3, streams  # one EventSource per upload, at least
    assert len(tokens_minted) == 3, tokens_minted  # a token per file...
    assert uploads_with_key == []  # ...and never the key on an upload request
    # The live region is emptied for a moment before each new message (dom.js `announce`).
    expect(page.locator("#announcer")).to_contain_text("ready", timeout=TIMEOUT_MS)

    ids = {name: console.image_id_of(name) for name in samples}
    for name, sample in samples.items():
        record = console.record(ids[name])
        assert record["status"] == "ready", record
        assert (record["format"], record["width"], record["height"]) == (
            sample.format,
            sample.width,
            sample.height,
        )
        assert record["blake3"] == file_blake3(sample.path)
        expect(console.card(ids[name])).to_be_visible()
        expect(console.card(ids[name]).locator(".thumb")).to_have_class(
            re.compile("loaded"), timeout=30_000
        )

    # The image page of the phone photo: the original's facts, every variant, the snippet.
    jpeg_id = ids["IMG_2041.jpg"]
    console.card(jpeg_id).get_by_role("link").click()
    expect(page.get_by_role("heading", name="IMG_2041.jpg", level=1)).to_be_visible()
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text(f"1200 {TIMES} 800")
    expect(facts).to_contain_text("6 (rotated 90° clockwise)")
    record = console.record(jpeg_id)
    expect(facts).to_contain_text(record["blake3"])
    expect(facts).to_contain_text(f"{record['size']:,} bytes")
    for variant in record["variants"]:
        row = page.locator(f'tr[data-variant="{variant["name"]}"]')
        expect(row).to_contain_text(variant["format"].upper())
        expect(row).to_contain_text(f"{variant['width']} {TIMES} {variant['height']}")
        expect(row.locator("img")).to_have_js_property("complete", True)

    snippet = page.get_by_label("<picture> snippet")
    expect(snippet).to_have_value(re.compile("<picture>"))
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_text("Copied.")).to_be_visible()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied == snippet.input_value()
    for variant in record["variants"]:
        pinned = variant["url"].split("://", 1)[1].split("/", 1)[1]  # path and ?v=
        assert f"/{pinned}&" in copied, (variant["name"], copied)
    for media_type in ("image/avif", "image/webp"):
        assert f'<source type="{media_type}"' in copied
    assert 'sizes="' in copied and "<img src=" in copied
    # Pasted into a page, it shows the image, in the first format the browser takes (AVIF).
    shown = page.evaluate(
        """async (html) => {
          const box = document.createElement("div");
          box.innerHTML = html;
          document.body.append(box);
          const img = box.querySelector("img");
          img.loading = "eager";
          await img.decode();
          const result = { src: img.currentSrc, width: img.naturalWidth };
          box.remove();
          return result;
        }""",
        copied,
    )
    assert "/variants/w" in shown["src"] and ".avif?" in shown["src"], shown
    assert shown["width"] > 0

    # Alt text, saved with PATCH and seen in the API's record and in the snippet.
    page.get_by_label("Alt text", exact=True).fill("Hills at dusk, seen from the ridge")
    page.get_by_label("Metadata (a JSON object)").fill('{"album": "holiday", "stars": 4}')
    page.get_by_role("button", name="Save").click()
    expect(page.get_by_text("Saved.")).to_be_visible()
    record = console.record(jpeg_id)
    assert record["alt"] == "Hills at dusk, seen from the ridge"
    assert record["metadata"] == {"album": "holiday", "stars": 4}
    expect(snippet).to_have_value(re.compile('alt="Hills at dusk, seen from the ridge"'))
    page.get_by_role("link", name="← All images").click()

    # Delete the PNG from its page, after confirming.
    png_id = ids["badge.png"]
    console.card(png_id).get_by_role("link").click()
    page.get_by_role("button", name="Delete image…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Delete badge.png?")
    dialog.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("heading", name="Upload")).to_be_visible()
    expect(console.card(png_id)).to_have_count(0)
    expect(console.card(jpeg_id)).to_be_visible()
    assert console.api.request("GET", f"/v1/images/{png_id}").status == 404
    assert console.tab.errors() == []


# ---------------------------------------------------------------------------- a network drop


def throttle_uploads(console: Console, bytes_per_second: int) -> None:
    """Chromium's own network emulation: request bodies leave at this rate."""
    cdp = console.tab.context.new_cdp_session(console.page)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": bytes_per_second,
        },
    )


@pytest.fixture(scope="module")
def big_photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uncompressed TIFF of ~12 MiB: long enough to cut the network in the middle."""
    path = tmp_path_factory.mktemp("console-big") / "scan.tiff"
    write_rgb_tiff(path, 2048, 2048)
    return path


def test_an_upload_cut_by_the_network_resumes_to_completion(
    console: Console, big_photo: Path, worker: servers.Server
) -> None:
    page = console.page
    patches: list[int] = []  # the Upload-Offset of every PATCH the page sent
    page.on(
        "request",
        lambda r: patches.append(int(r.headers["upload-offset"])) if r.method == "PATCH" else None,
    )
    console.open()
    console.sign_in()
    throttle_uploads(console, 2 * 1024 * 1024)
    console.choose(big_photo)
    row = console.row("scan.tiff")
    bar = row.get_by_role("progressbar")
    wait_until(
        lambda: int(bar.get_attribute("aria-valuenow") or 0) >= 20, "20 % uploaded", timeout=60
    )
    console.tab.context.set_offline(True)
    expect(row).to_have_attribute("data-state", "offline")
    expect(row.locator(".state")).to_have_text("offline, resumes when the network is back")
    at_cut = int(bar.get_attribute("aria-valuenow") or 0)
    assert 20 <= at_cut < 100
    page.wait_for_timeout(1500)  # offline for a while: the page waits, it does not fail
    expect(row).to_have_attribute("data-state", "offline")
    assert bar.get_attribute("aria-valuenow") == str(at_cut)
    console.tab.context.set_offline(False)

    expect(bar).to_have_attribute("aria-valuenow", "100", timeout=TIMEOUT_MS)
    expect(row).to_have_attribute("data-state", "ready", timeout=TIMEOUT_MS)
    # It went on from the server's offset, not from the start, and the bytes are whole.
    assert len(patches) >= 2 and patches[0] == 0 and patches[-1] > 0, patches
    record = console.record(console.image_id_of("scan.tiff"))
    assert record["blake3"] == file_blake3(big_photo)
    assert record["size"] == big_photo.stat().st_size
    assert console.tab.errors() == []


def test_pause_resume_and_cancel(
    console: Console, big_photo: Path, store: Store, worker: servers.Server
) -> None:
    page = console.page
    console.open()
    console.sign_in()
    throttle_uploads(console, 2 * 1024 * 1024)
    console.choose(big_photo)
    row = console.row("scan.tiff")
    bar = row.get_by_role("progressbar")
    wait_until(lambda: int(bar.get_attribute("aria-valuenow") or 0) >= 10, "10 % uploaded")
    row.get_by_role("button", name="Pause scan.tiff").click()
    expect(row).to_have_attribute("data-state", "paused")
    paused_at = bar.get_attribute("aria-valuenow")
    page.wait_for_timeout(1000)
    assert bar.get_attribute("aria-valuenow") == paused_at  # nothing moves while paused
    row.get_by_role("button", name="Resume scan.tiff").press("Enter")  # the keyboard works
    wait_until(
        lambda: int(bar.get_attribute("aria-valuenow") or 0) > int(paused_at or 0),
        "progress after resuming",
    )
    row.get_by_role("button", name="Cancel scan.tiff").click()
    expect(row).to_have_attribute("data-state", "cancelled")
    # Cancelling terminates the tus upload: its multipart upload is aborted on the server.
    wait_until(lambda: not store.incomplete_uploads(), "the upload terminated on the server")
    assert console.api.request("GET", "/v1/images").json["images"] == []


# ---------------------------------------------------------------------------- drop and paste


def test_a_drop_and_a_paste_upload_what_they_carry(
    console: Console, worker: servers.Server
) -> None:
    """Synthetic drop and paste events (a test cannot drag from the desktop): files of a
    drop are uploaded, what is not an image is skipped, a pasted image gets a name."""
    page = console.page
    console.open()
    console.sign_in()
    page.evaluate(
        """async () => {
          const canvas = document.createElement("canvas");
          canvas.width = 320; canvas.height = 200;
          const g = canvas.getContext("2d");
          g.fillStyle = "#2f5bd3"; g.fillRect(0, 0, 320, 200);
          const blob = await new Promise((r) => canvas.toBlob(r, "image/png"));
          const drop = new DataTransfer();
          drop.items.add(new File([blob], "dropped.png", { type: "image/png" }));
          drop.items.add(new File(["hello"], "notes.txt", { type: "text/plain" }));
          const zone = document.getElementById("dropzone");
          const dropped = { dataTransfer: drop, bubbles: true, cancelable: true };
          zone.dispatchEvent(new DragEvent("drop", dropped));
          const paste = new DataTransfer();
          paste.items.add(new File([blob], "image.png", { type: "image/png" }));
          const pasted = { clipboardData: paste, bubbles: true };
          document.dispatchEvent(new ClipboardEvent("paste", pasted));
        }"""
    )
    expect(page.get_by_text("Skipped 1 file that is not an image.")).to_be_visible()
    expect(console.row("dropped.png")).to_have_attribute("data-state", "ready", timeout=TIMEOUT_MS)
    pasted = page.locator("li.upload .upload-name", has_text=re.compile(r"^pasted-.*\.png$"))
    expect(pasted).to_have_count(1)
    names = sorted(r["filename"] for r in console.api.request("GET", "/v1/images").json["images"])
    assert names[0] == "dropped.png" and names[1].startswith("pasted-"), names


# ---------------------------------------------------------------------------- screenshots


def test_screenshots_of_the_gallery_and_the_image_page(
    console: Console, samples: dict[str, Sample], worker: servers.Server, tmp_path: Path
) -> None:
    """A gallery of a few converted pictures and one image page, at a laptop's width, and
    the gallery at a phone's (360 px) without sideways scrolling."""
    page = console.page
    folder = tmp_path / "more"
    folder.mkdir()
    extra = []
    for i, (w, h) in enumerate([(1600, 1000), (1000, 1400), (1400, 900), (1200, 1200)]):
        path = folder / f"trail-{i + 1}.jpg"
        path.write_bytes(pixels.save(scene(w, h, (i + 1) % 5), "JPEG", quality=85))
        extra.append(path)
    page.set_viewport_size({"width": 1280, "height": 900})
    page.emulate_media(reduced_motion="reduce")  # no fade-in caught half-way in a picture
    console.open()
    console.sign_in()
    console.choose(*extra, *(s.path for s in samples.values()))
    for path in [*extra, *(s.path for s in samples.values())]:
        expect(console.row(path.name)).to_have_attribute("data-state", "ready", timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Clear finished").click()
    page.reload()  # the gallery as a person finds it later: newest first, from the listing
    expect(page.locator("li.card")).to_have_count(7)
    for thumb in page.locator("li.card .thumb").all():
        expect(thumb).to_have_class(re.compile("loaded"), timeout=30_000)
    out = shot_dir(tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "console-gallery.png"), full_page=True)

    # Until a thumbnail loads, its card shows the record's placeholder: the colour, and the
    # ThumbHash decoded in the page (here no thumbnail ever loads).
    page.route(re.compile(r"/best\?"), lambda route: route.abort())
    page.reload()
    records = console.api.request("GET", "/v1/images").json["images"]
    for record in records:
        placeholder = record["placeholder"]
        assert placeholder is not None, record  # the worker sets it when it decodes
        thumb = console.card(record["id"]).locator(".thumb")
        red, green, blue = (int(placeholder["color"][i : i + 2], 16) for i in (1, 3, 5))
        expect(thumb).to_have_css("background-color", f"rgb({red}, {green}, {blue})")
        expect(thumb.locator("img.thumbhash")).to_have_attribute(
            "src", re.compile("^data:image/png;base64,")
        )
        decoded = thumb.locator("img.thumbhash")
        expect(decoded).to_have_js_property("complete", True)
        assert 0 < decoded.evaluate("img => img.naturalWidth") <= 32  # ThumbHash: 32 px at most
    page.screenshot(path=str(tmp_path / "console-placeholders.png"), full_page=True)
    page.unroute(re.compile(r"/best\?"))

    jpeg = next(
        r
        for r in console.api.request("GET", "/v1/images").json["images"]
        if r["filename"] == "IMG_2041.jpg"
    )
    console.api.request(
        "PATCH",
        f"/v1/images/{jpeg['id']}",
        b'{"alt": "Hills at dusk, seen from the ridge", "metadata": {"album": "holiday"}}',
        {"Content-Type": "application/merge-patch+json"},
    )
    page.goto(f"{console.base}/#/images/{jpeg['id']}")
    expect(page.get_by_role("heading", name="IMG_2041.jpg", level=1)).to_be_visible()
    expect(page.locator(".preview .thumb")).to_have_class(re.compile("loaded"))
    for img in page.locator(".variant-preview img").all():
        expect(img).to_have_js_property("complete", True)
    expect(page.get_by_label("<picture> snippet")).to_have_value(re.compile("<picture>"))
    page.screenshot(path=str(out / "console-image.png"), full_page=True)

    page.set_viewport_size({"width": 360, "height": 740})
    page.goto(f"{console.base}/#/")
    expect(page.locator("li.card")).to_have_count(7)
    assert wider_than_the_screen(page) == []
    page.goto(f"{console.base}/#/images/{jpeg['id']}")
    expect(page.get_by_role("heading", name="IMG_2041.jpg", level=1)).to_be_visible()
    assert wider_than_the_screen(page) == []
    page.screenshot(path=str(tmp_path / "console-image-phone.png"), full_page=True)
    # The only errors the browser logged are the thumbnails this test refused to load.
    assert [e for e in console.tab.errors() if "net::ERR_FAILED" not in e] == []

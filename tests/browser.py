"""Helpers for direct-upload tests: a browser (Debian's chromium driven by Playwright), a
static site on another origin for its pages, real images to upload, and a forwarder that
cuts an upload mid-body.

- `launch_chromium` starts the system's `chromium` through `executable_path`: no browser
  build is downloaded (make test installs Debian's package).
- `StaticSite` serves tests/pages/, api/static/vendor/ and a directory of generated files
  on 127.0.0.1 and a free port: an origin other than the API's, as a web app's would be.
- `Tab` is one page of a fresh browser context that keeps the console's messages, so a
  failing test shows what the page said (tests/integration/conftest.py adds them, and a
  screenshot, to the report).
- `Tripwire` is a tests/faults.py `Outage` that cuts every connection once a set number of
  client bytes has passed after `arm()`: the cut lands inside a request body at a byte
  count, not at a moment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from blake3 import blake3
from PIL import Image
from playwright.sync_api import Browser, ConsoleMessage, Page, Playwright

from tests.faults import Outage, pump
from tests.http import Api
from tests.servers import Server

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "tests" / "pages"
VENDOR = ROOT / "api" / "static" / "vendor"
MiB = 1024 * 1024


# ---------------------------------------------------------------------------- the browser


def launch_chromium(playwright: Playwright) -> Browser:
    """Headless Debian chromium; `--no-sandbox` as root, where its sandbox refuses to start."""
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("chromium is not installed (make test installs it: make chromium)")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    return playwright.chromium.launch(executable_path=executable, headless=True, args=args)


class Tab:
    """A page in its own browser context, with everything its console said."""

    def __init__(self, browser: Browser, shots: Path) -> None:
        self.context = browser.new_context()
        self.page: Page = self.context.new_page()
        self.shots = shots
        self.console: list[str] = []
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console.append(f"[pageerror] {exc}"))

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"[{message.type}] {message.text}")

    def errors(self) -> list[str]:
        return [line for line in self.console if line.startswith(("[error]", "[pageerror]"))]

    def open(self, url: str) -> None:
        """Load a page and wait until its scripts ran (`window.client` is defined)."""
        self.page.goto(url)
        self.page.wait_for_function("typeof window.client === 'object'")

    def call(self, function: str, *args: Any) -> Any:
        """`await window.client[function](...args)` in the page; its (JSON) result."""
        return self.page.evaluate(
            "([name, args]) => window.client[name](...args)", [function, list(args)]
        )

    def wait_for(self, expression: str, timeout: float = 60) -> Any:
        """Poll an expression in the page until it is truthy (Playwright's deadline)."""
        return self.page.wait_for_function(expression, timeout=timeout * 1000).json_value()

    def screenshot(self) -> Path:
        self.shots.mkdir(parents=True, exist_ok=True)
        path = self.shots / "browser-failure.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


# ---------------------------------------------------------------------------- the other origin


class _Handler(SimpleHTTPRequestHandler):
    """Files under a few URL prefixes, each from its own directory; nothing else."""

    def __init__(self, *args: Any, roots: Mapping[str, Path], log: list[str], **kw: Any) -> None:
        self.roots = roots
        self.log = log
        super().__init__(*args, **kw)

    def translate_path(self, path: str) -> str:
        parts = [p for p in unquote(urlsplit(path).path).split("/") if p]
        if len(parts) < 2 or parts[0] not in self.roots or ".." in parts:
            return str(PAGES / "no-such-file")  # a 404
        return str(self.roots[parts[0]].joinpath(*parts[1:]))

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        self.log.append(format % args)


class StaticSite:
    """A plain HTTP server on 127.0.0.1 and a free port: /pages/ (tests/pages), /vendor/
    (api/static/vendor) and /files/ (`files`). Its origin is what the API's CORS lists."""

    def __init__(self, files: Path) -> None:
        self.log: list[str] = []
        roots = {"pages": PAGES, "vendor": VENDOR, "files": files}
        handler = partial(_Handler, roots=roots, log=self.log)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.origin}/{path.lstrip('/')}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


# ---------------------------------------------------------------------------- real images


def write_rgb_tiff(path: Path, width: int, height: int) -> str:
    """A genuine, uncompressed 8-bit RGB TIFF (a gradient under noise, so no two rows are
    alike and its variants are real work); returns its BLAKE3 hex digest."""
    red = Image.linear_gradient("L").resize((width, height))
    green = Image.linear_gradient("L").rotate(90).resize((width, height))
    blue = Image.effect_noise((width, height), 48)
    Image.merge("RGB", (red, green, blue)).save(path, format="TIFF")
    return file_blake3(path)


def file_blake3(path: Path) -> str:
    hasher = blake3()
    with path.open("rb") as f:
        while block := f.read(MiB):
            hasher.update(block)
    return str(hasher.hexdigest())


# ---------------------------------------------------------------------------- faults


class Tripwire(Outage):
    """A forwarder to `target_port` that is up until it trips: after `arm(n)`, the chunk of
    client bytes that takes the count past `n` is not forwarded, every connection is cut
    (`cut()`) and new ones are closed at once until `restore()`. `refused` is set once a
    client has tried again while it was down."""

    def __init__(self, target_port: int) -> None:
        self._budget: int | None = None
        self.tripped = threading.Event()
        self.refused = threading.Event()
        super().__init__(target_port, down=False)

    def arm(self, after: int) -> None:
        with self._lock:
            self._budget = after

    def restore(self) -> None:
        self.down = False

    def _spend(self, n: int) -> bool:
        """Count n client bytes; True when they trip the wire (once)."""
        with self._lock:
            if self._budget is None:
                return False
            self._budget -= n
            if self._budget > 0:
                return False
            self._budget = None
        return True

    def _serve(self, client: socket.socket) -> None:
        if self.down:
            self.refused.set()
            self.connections += 1
            client.close()
            return
        self.connections += 1
        upstream = self._connect(client)
        if upstream is None:
            return
        down = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        down.start()
        threading.Thread(target=self._up, args=(client, upstream, down), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, down: threading.Thread) -> None:
        try:
            while chunk := client.recv(65536):
                if self._spend(len(chunk)):
                    self.tripped.set()  # before the cut, which is what clients notice
                    self.cut()
                    return
                upstream.sendall(chunk)
        except OSError:
            # The server closed with our bytes unread (an early answer such as a 423). Once
            # its answer is relayed, close the client's end too: with bytes unread that
            # resets it, as the server's own close would have. Left half-open, a browser
            # still sending the body would wait for ever.
            down.join(timeout=10)
            with contextlib.suppress(OSError):
                client.close()
        finally:
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)


# ---------------------------------------------------------------------------- the API side


def mint_token(api: Api, **claims: Any) -> str:
    """An upload token minted with the API key (`POST /v1/upload-tokens`)."""
    resp = api.request(
        "POST",
        "/v1/upload-tokens",
        json.dumps(claims).encode(),
        {"Content-Type": "application/json"},
    )
    assert resp.status == 201, (resp.status, resp.body)
    token = resp.json["token"]
    assert isinstance(token, str)
    return token


def upload_offset(api: Api, path: str, token: str | None = None) -> int:
    """The server's Upload-Offset of a tus upload (HEAD), with the token or the API key."""
    headers = {"Tus-Resumable": "1.0.0"}
    key = "default" if token is None else token
    resp = api.request("HEAD", path, headers=headers, key=key)
    assert resp.status == 200, (resp.status, resp.headers)
    return int(resp.headers["upload-offset"])


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def path_of(url: str) -> str:
    """The path (and query) of a URL the API gave, to send to another server or port."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


@dataclass
class DirectApi:
    """A gunicorn of its own for direct uploads (CORS for the site, signing key set),
    reached by clients through `wire` when there is one."""

    server: Server
    api: Api  # straight to gunicorn, with Alice's API key: the app's backend
    wire: Tripwire | None

    @property
    def port(self) -> int:
        """Where clients (the browser, tus clients) connect."""
        return self.wire.port if self.wire is not None else self.server.port

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None) -> Api:
        """An Api for what clients see (through the wire), sending `key` as the bearer."""
        return Api("127.0.0.1", self.port, key)

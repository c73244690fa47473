"""Real Redis and a real S3 server (SeaweedFS) for the whole session; each test starts clean.

`api` is a real gunicorn serving the app with the test settings; `client` is the same app
in-process through falcon.testing (faster, for behaviour that does not depend on the server).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import falcon.testing
import pytest
from playwright.sync_api import Browser, sync_playwright
from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer

from api.app import Collaborators, create_app
from api.main import build_collaborators
from core.settings import Settings
from core.storage import Store
from tests import browser as browser_helpers
from tests import images, servers
from tests.faults import Outage
from tests.http import Api
from tests.webhooks import Receiver
from worker.__main__ import listened_queues
from worker.services import JobServices

ALICE_KEY = "alice-key-0123456789abcdef"
BOB_KEY = "bob-key-0123456789abcdef00"
SIGNING_KEY = "signing-key-for-tests-0123456789abcdef"
MiB = 1024 * 1024


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[servers.Server]:
    server = servers.start_redis(workdir / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(workdir: Path) -> Iterator[servers.Server]:
    server = servers.start_seaweedfs(workdir / "s3")
    yield server
    server.stop()


def make_env(redis_url: str, s3_endpoint: str, **overrides: str) -> dict[str, str]:
    env = {
        "PORT": str(servers.free_port()),
        "REDIS_URL": redis_url,
        "S3_ENDPOINT": s3_endpoint,
        "S3_ACCESS_KEY": servers.S3_KEY,
        "S3_SECRET_KEY": servers.S3_SECRET,
        "S3_BUCKET": "picstream-test",
        "S3_REGION": "us-east-1",
        "PICSTREAM_API_KEYS": f"alice:{ALICE_KEY},bob:{BOB_KEY}",
        "PICSTREAM_PART_SIZE": "5MiB",
        "PICSTREAM_MAX_UPLOAD_BYTES": "300MiB",
        "PICSTREAM_READ_TIMEOUT": "2",
        "PICSTREAM_WEB_WORKERS": "1",
        "PICSTREAM_WEB_THREADS": "16",
        "PICSTREAM_MAX_DOWNLOADS": "4",
        "PICSTREAM_MAX_UPLOADS": "6",
        "PICSTREAM_MAX_EVENT_STREAMS": "4",
        "PICSTREAM_SSE_HEARTBEAT": "1",
        "PICSTREAM_SIGNING_KEY": SIGNING_KEY,
        "PICSTREAM_LOG_LEVEL": "info",
        # Conversion retries after a transient failure: seconds, not minutes, in tests.
        "PICSTREAM_RETRY_INTERVALS": "1,1,1,1",
        "PICSTREAM_WEBHOOK_RETRY_INTERVALS": "1,1,1",
    }
    env.update(overrides)
    return env


@pytest.fixture()
def s3_outage(s3_server: servers.Server) -> Iterator[Outage]:
    """A forwarder to the session's S3 server that a test can take down (`cut()`)."""
    with Outage(s3_server.port, down=False) as outage:
        yield outage


@pytest.fixture(scope="session")
def env(redis_server: servers.Server, s3_server: servers.Server) -> dict[str, str]:
    return make_env(redis_server.extra["url"], s3_server.extra["endpoint"])


@pytest.fixture(scope="session")
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture(scope="session")
def store(settings: Settings) -> Store:
    store = Store.from_settings(settings)
    store.ensure_bucket()
    return store


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> Iterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    client.close()
    client.connection_pool.disconnect()


@pytest.fixture(autouse=True)
def clean(store: Store, redis_client: Redis) -> None:
    """Every test starts with an empty Redis and an empty bucket."""
    redis_client.flushdb()
    for upload in store.incomplete_uploads():
        store.abort_upload(upload.key, upload.upload_id)
    for key in store.keys(""):
        store.delete(key)


def close_services(services: Collaborators) -> None:
    """Stop the thread pools and close every pooled connection (no ResourceWarnings)."""
    services.part_uploads.shutdown(wait=True)
    services.download_pool.shutdown(wait=True)
    services.records.redis.close()
    services.records.redis.connection_pool.disconnect()
    services.store.client._http.clear()


@pytest.fixture(scope="session")
def services(settings: Settings, store: Store) -> Iterator[Collaborators]:
    built = build_collaborators(settings)
    yield built
    close_services(built)


@pytest.fixture()
def client(services: Collaborators) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(services))


@pytest.fixture(scope="session")
def gunicorn(env: dict[str, str], workdir: Path, store: Store) -> Iterator[servers.Server]:
    server = servers.start_gunicorn(env, workdir / "web")
    yield server
    server.stop()


@pytest.fixture()
def api(gunicorn: servers.Server) -> Api:
    return Api("127.0.0.1", gunicorn.port, ALICE_KEY)


@pytest.fixture()
def start_api(
    workdir: Path, store: Store
) -> Iterator[Callable[[dict[str, str]], tuple[servers.Server, Api]]]:
    """Start an extra gunicorn with its own environment (stopped after the test)."""
    started: list[servers.Server] = []

    def start(env: dict[str, str]) -> tuple[servers.Server, Api]:
        env = {**env, "PORT": str(servers.free_port())}  # never the session server's port
        server = servers.start_gunicorn(env, workdir / "web-extra")
        started.append(server)
        return server, Api("127.0.0.1", server.port, ALICE_KEY)

    yield start
    for server in started:
        server.stop()


ConfigureJobs = Callable[[Settings], None]


@pytest.fixture()
def configure_jobs(settings: Settings) -> Iterator[ConfigureJobs]:
    """The worker's composition root for jobs run in this process: the jobs get the test
    settings, as `python -m worker` hands them its own. Call the fixture's value with other
    Settings to change what the jobs see (an S3 outage, a profiles file); the jobs are
    unconfigured again after the test."""
    JobServices.configure(settings)
    yield JobServices.configure
    JobServices.configure(None)


@pytest.fixture()
def run_jobs(
    configure_jobs: ConfigureJobs, redis_client: Redis, settings: Settings
) -> Callable[[], None]:
    """Run every queued job in-process: rq's SimpleWorker in burst mode on the worker's
    queues in the worker's order (fresh uploads, webhook deliveries, bulk reconversion),
    enqueuing retries that are due before it starts."""

    def run() -> None:
        queues = listened_queues(settings, redis_client)
        worker = SimpleWorker(queues, connection=redis_client, serializer=JSONSerializer)
        worker.work(burst=True, with_scheduler=True, logging_level="WARNING")

    return run


@pytest.fixture()
def client_with(
    env: dict[str, str], store: Store
) -> Iterator[Callable[..., falcon.testing.TestClient]]:
    """An in-process app with settings overridden (PICSTREAM_PROFILES=..., limits...)."""
    built: list[Collaborators] = []

    def make(**overrides: str) -> falcon.testing.TestClient:
        services = build_collaborators(Settings.from_env({**env, **overrides}))
        built.append(services)
        return falcon.testing.TestClient(create_app(services))

    yield make
    for services in built:
        close_services(services)


def pytest_report_header() -> str:
    return f"picstream integration: real redis-server and weed mini (pid {os.getpid()})"


@pytest.fixture(scope="session")
def nginx(env: dict[str, str], workdir: Path, store: Store) -> Iterator[servers.Front]:
    """nginx from deploy/nginx.conf, filled as `make run` fills it, in front of its own
    gunicorn on a unix socket with downloads handed off (PICSTREAM_ACCEL_REDIRECT=1). Parts
    and the upload limit are large enough for a 512 MiB body."""
    front = servers.start_front(
        {
            **env,
            "PORT": str(servers.free_port()),
            "PICSTREAM_PART_SIZE": "16MiB",
            "PICSTREAM_MAX_UPLOAD_BYTES": "600MiB",
        },
        workdir / "front",
    )
    yield front
    front.stop()


# ------------------------------------------------------------------ direct uploads (issue #9)
# A browser on another origin and tus clients uploading without the API key: Debian's
# chromium through Playwright, a static site for the browser's pages, real images to upload,
# and an API started with CORS for that site (optionally behind a Tripwire to cut it).

BROWSER_PROFILES = """
[profiles.default]
formats = ["jpeg"]
widths = [256]

[profiles.thumbs]
formats = ["webp", "jpeg"]
widths = [256, 512]
"""


@dataclass(frozen=True)
class SiteFile:
    """A generated image served by the site under /files/NAME."""

    path: Path
    blake3: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """Headless Debian chromium for the session (make test installs it)."""
    with sync_playwright() as playwright:
        browser = browser_helpers.launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture()
def browser_page(chromium: Browser, tmp_path: Path) -> Iterator[browser_helpers.Tab]:
    """A page in a fresh context. On failure its console and a screenshot (under the
    test's tmp_path) are added to the report (pytest_runtest_makereport below)."""
    tab = browser_helpers.Tab(chromium, tmp_path)
    yield tab
    tab.close()


@pytest.fixture(scope="session")
def site_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("site-files")


@pytest.fixture(scope="session")
def site(site_files: Path) -> Iterator[browser_helpers.StaticSite]:
    """The web app's origin: tests/pages, api/static/vendor and the generated images."""
    static = browser_helpers.StaticSite(site_files)
    yield static
    static.stop()


@pytest.fixture(scope="session")
def big_tiff(site_files: Path) -> SiteFile:
    """A genuine uncompressed RGB TIFF of about 64 MiB (4096 x 5461), made once."""
    path = site_files / "big.tiff"
    return SiteFile(path, browser_helpers.write_rgb_tiff(path, 4096, 5461))


@pytest.fixture(scope="session")
def medium_tiff(site_files: Path) -> SiteFile:
    """A genuine uncompressed RGB TIFF of about 16.5 MiB (2400 x 2400): several S3 parts."""
    path = site_files / "medium.tiff"
    return SiteFile(path, browser_helpers.write_rgb_tiff(path, 2400, 2400))


@pytest.fixture(scope="session")
def tiny_png(site_files: Path) -> SiteFile:
    """A complete 3 x 2 PNG of a few dozen bytes."""
    path = site_files / "tiny.png"
    path.write_bytes(images.png())
    return SiteFile(path, browser_helpers.file_blake3(path))


@pytest.fixture(scope="session")
def browser_profiles(site_files: Path) -> Path:
    """Conversion profiles small enough for a 22-megapixel image in a test: `thumbs`."""
    path = site_files.parent / "browser-profiles.toml"
    path.write_text(BROWSER_PROFILES)
    return path


STARTED_APIS = pytest.StashKey[list[browser_helpers.DirectApi]]()


@pytest.fixture()
def start_direct_api(
    request: pytest.FixtureRequest,
    env: dict[str, str],
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]],
    site: browser_helpers.StaticSite,
    browser_profiles: Path,
) -> Iterator[Callable[..., browser_helpers.DirectApi]]:
    """Start a gunicorn that lets the site's origin in (PICSTREAM_CORS_ORIGINS), signs
    links and knows the `thumbs` profile; `wired=True` puts a Tripwire between it and its
    clients. Overrides are more environment. A failed test's report shows their logs."""
    started: list[browser_helpers.DirectApi] = request.node.stash.setdefault(STARTED_APIS, [])

    def start(*, wired: bool = False, **overrides: str) -> browser_helpers.DirectApi:
        server, api = start_api(
            {
                **env,
                "PICSTREAM_CORS_ORIGINS": site.origin,
                "PICSTREAM_SIGNING_KEY": SIGNING_KEY,
                "PICSTREAM_PROFILES": str(browser_profiles),
                **overrides,
            }
        )
        wire = browser_helpers.Tripwire(server.port) if wired else None
        started.append(browser_helpers.DirectApi(server, api, wire))
        return started[-1]

    yield start
    for direct in started:
        if direct.wire is not None:
            direct.wire.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed direct-upload test's report shows the page's console, where its screenshot
    is, and the log of each gunicorn `start_direct_api` started."""
    report: pytest.TestReport = yield
    if report.when != "call" or not report.failed:
        return report
    for direct in item.stash.get(STARTED_APIS, []):
        log = direct.server.output()[-6000:]
        report.sections.append((f"gunicorn on port {direct.server.port}", log))
    tab = getattr(item, "funcargs", {}).get("browser_page")
    if isinstance(tab, browser_helpers.Tab):
        report.sections.append(("browser console", "\n".join(tab.console) or "(empty)"))
        try:
            shot = str(tab.screenshot())
        except Exception as exc:  # noqa: BLE001 - a dead page must not hide the failure
            shot = f"no screenshot: {exc}"
        report.sections.append(("browser screenshot", shot))
    return report


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on loopback (tests/webhooks.py), stopped after the test."""
    server = Receiver()
    yield server
    server.stop()

"""Configuration: one frozen Settings built from the environment, in one place.

`Settings.from_env(env, concerns)` is the only reader of the environment in the project. It
fails fast with a `ConfigError` that names the bad variable, so a typo stops the process at
start-up instead of surfacing as a confusing error on the first request.

The variables are grouped by concern (`Concern`: storage, jobs, profiles, web, conversion,
janitor, webhooks), and each process reads and checks only the concerns it uses
(`WEB_PROCESS`, `WORKER_PROCESS`; the admin command per command): a bad web-only variable
does not stop the worker, nor a bad conversion-only one the web. Without `concerns`, every
concern is read (the dev launcher, tests, benchmarks). The fields of a concern not read keep
their defaults; the process does not use them.

Each group of fields a component is handed can also be read as one small frozen view:
`settings.storage`, `settings.web`, `settings.conversion`, `settings.webhooks`. A view refuses
to be read (`ConcernNotRead`) in a process that did not read the concerns it draws on.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlsplit

from core.errors import InvalidWebhookUrl
from core.profiles import ProfileError, Profiles, default_profiles, load_profiles
from core.sniff import SUPPORTED_FORMATS
from core.webhooks import host_allowed

MiB = 1024 * 1024
GiB = 1024 * MiB

# S3 rules: parts are 5 MiB .. 5 GiB and an upload has at most 10,000 of them.
S3_MIN_PART = 5 * MiB
S3_MAX_PART = 5 * GiB
S3_MAX_PARTS = 10_000

OWNER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
QUEUE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_KEY_LENGTH = 16
DEFAULT_FORMATS = SUPPORTED_FORMATS
_CACHE = ("private", "public")
# Stores abort unfinished multipart uploads on their own after a day (MinIO's default):
# a resumable upload must end before that.
TUS_MAX_EXPIRY = 23 * 3600.0


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


class ConcernNotRead(RuntimeError):
    """Code read a view of settings its process did not read from the environment."""


class Concern(StrEnum):
    """A group of variables read and checked together. Each process reads the ones it uses."""

    STORAGE = "storage"  # S3 and Redis: every process
    JOBS = "jobs"  # queue names, job timeout, retry waits: whoever queues or runs jobs
    PROFILES = "profiles"  # PICSTREAM_PROFILES: whoever plans variants (web) or renders them
    WEB = "web"  # the API process: listening, keys, limits, thread budgets, tokens, tus
    CONVERSION = "conversion"  # decoding limits, threads and memory of conversion jobs
    JANITOR = "janitor"  # how often the workers sweep
    WEBHOOK_HOSTS = "webhook hosts"  # the allow-list alone: checked at upload
    WEBHOOKS = "webhooks"  # deliveries: the allow-list, signing key, owner URLs, retries
    METRICS = "metrics"  # the Prometheus listeners (core/metrics.py): web and workers


EVERY_CONCERN = frozenset(Concern)
# What `api.main:app()` and the gunicorn config read: the web checks callback URLs against
# the allow-list but never delivers, and queues conversions it never runs.
WEB_PROCESS = frozenset(
    {Concern.STORAGE, Concern.JOBS, Concern.PROFILES, Concern.WEB, Concern.WEBHOOK_HOSTS}
    | {Concern.METRICS}
)
# What `python -m worker` reads: conversions, deliveries, and the janitor's sweeps.
WORKER_PROCESS = frozenset(
    {
        Concern.STORAGE,
        Concern.JOBS,
        Concern.PROFILES,
        Concern.CONVERSION,
        Concern.JANITOR,
        Concern.WEBHOOK_HOSTS,
        Concern.WEBHOOKS,
        Concern.METRICS,
    }
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The settings of one process. The fields are grouped as the concerns are; a process
    that did not read a concern must not use its fields (see the module docstring)."""

    # ------------------------------------------------------------ storage: S3 and Redis
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str = field(repr=False)
    s3_bucket: str = "picstream"
    s3_region: str = "us-east-1"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Every Redis call gives up after this; an upload's commit is fenced at twice it.
    redis_timeout: float = 5.0
    # An upload's commit is answered once this many replicas have it (at most as many as
    # are online: none with a single Redis), waiting at most redis_wait_timeout
    # (core/records.py `Records.commit`); 0: never wait.
    redis_wait_replicas: int = 1
    redis_wait_timeout: float = 1.0

    # ------------------------------------------------------------ jobs: the queues
    # One queue per kind of job, drained in this order by the workers: fresh uploads,
    # webhook deliveries (a slow receiver must not hold up a conversion), reconversions.
    queue: str = "convert"
    webhook_queue: str = "webhooks"
    bulk_queue: str = "reconvert"
    job_timeout: int = 600
    # Waits before each retry of a conversion after a transient failure (S3/Redis down).
    retry_intervals: tuple[int, ...] = (5, 20, 60, 180)

    # ------------------------------------------------------------ profiles
    # Profiles come from PICSTREAM_PROFILES, parsed here so a bad file stops the processes
    # that use it (web and worker) at start-up; `profiles_path` is that file ("" for the
    # built-in profiles), which the worker reads again for every job.
    profiles: Profiles = field(default_factory=default_profiles, repr=False)
    profiles_path: str = ""

    # ------------------------------------------------------------ web: the API process
    # What clients can reach the store at, for ?redirect=1 presigned URLs.
    s3_public_endpoint: str = ""
    part_size: int = 16 * MiB  # of the uploads' multipart parts
    port: int = 8000
    host: str = "127.0.0.1"
    # Where gunicorn listens (`host:port` or `unix:/path`) when nginx is in front of it and
    # PORT is nginx's; empty: PICSTREAM_HOST:PORT.
    bind: str = ""
    # Behind deploy/nginx.conf: downloads are handed to nginx (X-Accel-Redirect).
    accel_redirect: bool = False
    # (owner, key) pairs; an owner may hold several keys (rotation). Kept out of repr so a
    # logged Settings never shows a secret.
    api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    max_upload_bytes: int = 1 * GiB
    max_pixels: int = 100_000_000  # also checked by the worker, before decoding
    max_head_bytes: int = 2 * MiB
    allowed_formats: frozenset[str] = frozenset(DEFAULT_FORMATS)
    read_timeout: float = 30.0
    web_workers: int = 2
    # Each request holds a thread; uploads, event streams and downloads hold theirs for long
    # (a download as long as its client takes to read it), so each kind gets its own budget of
    # slots within the threads (api/limits.py), and what the budgets leave serves everything
    # else (health checks, records, HEAD/304, refusals). 96 threads, not the former 64: with
    # 64, uploads and event streams left 8 threads, too few to share with downloads. Unset,
    # the download budget is half of what the other two leave (here 20), so as many threads
    # stay free as downloads may take; an idle thread costs ~36 KiB.
    web_threads: int = 96
    max_uploads: int = 16
    max_event_streams: int = 40
    max_downloads: int = 20
    sse_heartbeat: float = 15.0
    # A client that acknowledges none of our bytes for this long is cut, and its thread and
    # slot freed (api/gunicorn.py).
    send_timeout: float = 30.0
    # Signed links (HMAC); None disables them.
    signing_key: bytes | None = field(default=None, repr=False)
    presign_seconds: int = 300
    # An upload's lease (its id reservation and multipart registration) lives this long
    # unless renewed; the uploading process renews it every third of it.
    lease_seconds: float = 15.0
    # Browsers on these origins may call the API (exact `scheme://host[:port]`); "*" lets
    # any origin read signed links, never anything that needs a key or token.
    cors_origins: frozenset[str] = frozenset()
    # Signed links answered `Cache-Control: public` (a CDN may keep them until they expire)
    # instead of `private`.
    signed_cache_public: bool = False
    # Upload tokens (POST /v1/upload-tokens): lifetime and uploads when the request names
    # none, and the most a request may ask for.
    token_ttl: int = 3600
    token_max_ttl: int = 86_400
    token_uploads: int = 1
    token_max_uploads: int = 1000
    # A resumable (tus) upload must finish within this of its creation. Kept below the
    # store's own expiry of unfinished multipart uploads (MinIO: 24 h), so the janitor, not
    # the store, ends it, and its state and parts go together.
    tus_expiry: float = 12 * 3600.0

    # ------------------------------------------------------------ conversion (worker)
    # (max_pixels, above, is read by both: the web checks headers, the worker decodes.)
    max_frames: int = 100
    # Variants encoded at once within one job (libvips releases the GIL).
    convert_threads: int = 2
    # Data-segment limit of one conversion process (RLIMIT_DATA); 0 = none.
    job_memory: int = 1 * GiB

    # ------------------------------------------------------------ janitor (worker)
    # Seconds between janitor sweeps (stale multipart uploads, pending purges).
    janitor_interval: float = 300.0

    # ------------------------------------------------------------ webhooks
    # The hosts that may be called (the web checks callback URLs against them too), the
    # HMAC key, owner -> URL defaults and the retry waits.
    webhook_hosts: frozenset[str] = frozenset()
    webhook_secret: bytes | None = field(default=None, repr=False)
    owner_webhooks: tuple[tuple[str, str], ...] = ()
    webhook_retry_intervals: tuple[int, ...] = (10, 30, 120, 600, 1800, 3600)

    # ------------------------------------------------------------ metrics (core/metrics.py)
    # The web's Prometheus listener (0: none) and the worker's, one per `python -m worker`;
    # both on metrics_host (loopback unless told), never on the public port. metrics_dir is
    # prometheus_client's multiprocess directory ("": a fresh one per process tree).
    metrics_port: int = 0
    worker_metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_dir: str = ""

    # ------------------------------------------------------------ every process
    log_level: str = "info"
    # `text` or `json` (one object per line), for every process (core/logs.py).
    log_format: str = "text"
    # The concerns read from the environment; the fields of the others are defaults.
    concerns: frozenset[Concern] = EVERY_CONCERN

    @property
    def s3_secure(self) -> bool:
        return urlsplit(self.s3_endpoint).scheme == "https"

    @property
    def s3_host(self) -> str:
        """host:port as the minio SDK wants it."""
        return urlsplit(self.s3_endpoint).netloc

    def _require(self, view: str, *needed: Concern) -> None:
        missing = [str(concern) for concern in needed if concern not in self.concerns]
        if missing:
            raise ConcernNotRead(
                f"settings.{view} draws on the {', '.join(missing)} settings, which this"
                " process did not read (Settings.from_env's concerns)"
            )

    @property
    def storage(self) -> StorageSettings:
        self._require("storage", Concern.STORAGE, Concern.JANITOR)
        return StorageSettings(
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key,
            bucket=self.s3_bucket,
            region=self.s3_region,
            redis_url=self.redis_url,
            redis_timeout=self.redis_timeout,
            janitor_interval=self.janitor_interval,
        )

    @property
    def web(self) -> WebSettings:
        self._require("web", Concern.WEB)
        return WebSettings(
            public_endpoint=self.s3_public_endpoint,
            part_size=self.part_size,
            port=self.port,
            host=self.host,
            bind=self.bind,
            accel_redirect=self.accel_redirect,
            api_keys=self.api_keys,
            max_upload_bytes=self.max_upload_bytes,
            max_pixels=self.max_pixels,
            max_head_bytes=self.max_head_bytes,
            allowed_formats=self.allowed_formats,
            read_timeout=self.read_timeout,
            workers=self.web_workers,
            threads=self.web_threads,
            max_uploads=self.max_uploads,
            max_event_streams=self.max_event_streams,
            max_downloads=self.max_downloads,
            sse_heartbeat=self.sse_heartbeat,
            send_timeout=self.send_timeout,
            signing_key=self.signing_key,
            presign_seconds=self.presign_seconds,
            lease_seconds=self.lease_seconds,
            cors_origins=self.cors_origins,
            signed_cache_public=self.signed_cache_public,
            token_ttl=self.token_ttl,
            token_max_ttl=self.token_max_ttl,
            token_uploads=self.token_uploads,
            token_max_uploads=self.token_max_uploads,
            tus_expiry=self.tus_expiry,
        )

    @property
    def conversion(self) -> ConversionSettings:
        self._require("conversion", Concern.JOBS, Concern.PROFILES, Concern.CONVERSION)
        return ConversionSettings(
            queue=self.queue,
            bulk_queue=self.bulk_queue,
            job_timeout=self.job_timeout,
            profiles=self.profiles,
            profiles_path=self.profiles_path,
            max_pixels=self.max_pixels,
            max_frames=self.max_frames,
            threads=self.convert_threads,
            retry_intervals=self.retry_intervals,
            job_memory=self.job_memory,
        )

    @property
    def webhooks(self) -> WebhookSettings:
        self._require("webhooks", Concern.JOBS, Concern.WEBHOOKS)
        return WebhookSettings(
            hosts=self.webhook_hosts,
            secret=self.webhook_secret,
            owner_urls=self.owner_webhooks,
            retry_intervals=self.webhook_retry_intervals,
            queue=self.webhook_queue,
        )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], concerns: Collection[Concern] = EVERY_CONCERN
    ) -> Settings:
        """Read and check the variables of `concerns` (every one unless told) and raise a
        ConfigError naming the first bad one. The fields of the other concerns keep their
        defaults, and the views drawing on them refuse to be read."""
        r = _Reader(env)
        read = frozenset(concerns) | {Concern.STORAGE}  # every process has a store and a Redis
        fields: dict[str, Any] = {
            "log_level": r.choice(
                "PICSTREAM_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            "log_format": r.choice("PICSTREAM_LOG_FORMAT", "text", ("text", "json")),
            "concerns": read,
        }
        for concern in Concern:  # declaration order: the same first error every time
            if concern in read:
                fields.update(_READERS[concern](r))
        return cls(**fields)


def _storage(r: _Reader) -> dict[str, Any]:
    redis_timeout = r.seconds("PICSTREAM_REDIS_TIMEOUT", 5.0)
    # The WAIT must end before the client stops reading its answer.
    wait_timeout = r.seconds("PICSTREAM_REDIS_WAIT_TIMEOUT", min(1.0, redis_timeout / 2))
    if wait_timeout >= redis_timeout:
        raise ConfigError("PICSTREAM_REDIS_WAIT_TIMEOUT must be below PICSTREAM_REDIS_TIMEOUT")
    return {
        "s3_endpoint": r.url("S3_ENDPOINT", None, ("http", "https")),
        "s3_access_key": r.text("S3_ACCESS_KEY", None),
        "s3_secret_key": r.text("S3_SECRET_KEY", None),
        "s3_bucket": r.bucket("S3_BUCKET", "picstream"),
        "s3_region": r.text("S3_REGION", "us-east-1"),
        "redis_url": r.redis_url("REDIS_URL", "redis://127.0.0.1:6379/0"),
        "redis_timeout": redis_timeout,
        "redis_wait_replicas": r.integer("PICSTREAM_REDIS_WAIT_REPLICAS", 1, 0, 64),
        "redis_wait_timeout": wait_timeout,
    }


def _jobs(r: _Reader) -> dict[str, Any]:
    queue = r.name("PICSTREAM_QUEUE", "convert")
    bulk_queue = r.name("PICSTREAM_BULK_QUEUE", "reconvert")
    webhook_queue = r.name("PICSTREAM_WEBHOOK_QUEUE", "webhooks")
    _check_queues(queue, bulk_queue, webhook_queue)
    return {
        "queue": queue,
        "bulk_queue": bulk_queue,
        "webhook_queue": webhook_queue,
        "job_timeout": r.integer("PICSTREAM_JOB_TIMEOUT", 600, 1, 86_400),
        "retry_intervals": r.intervals("PICSTREAM_RETRY_INTERVALS", (5, 20, 60, 180)),
    }


def _profiles(r: _Reader) -> dict[str, Any]:
    return {
        "profiles": r.profiles("PICSTREAM_PROFILES"),
        "profiles_path": r.text("PICSTREAM_PROFILES", ""),
    }


def _web(r: _Reader) -> dict[str, Any]:
    part_size = r.size("PICSTREAM_PART_SIZE", 16 * MiB, S3_MIN_PART, S3_MAX_PART)
    threads = r.integer("PICSTREAM_WEB_THREADS", 96, 1, 4096)
    uploads = r.integer("PICSTREAM_MAX_UPLOADS", 16, 1, 4096)
    streams = r.integer("PICSTREAM_MAX_EVENT_STREAMS", 40, 0, 4096)
    # Derived when unset, so a deployment that sized threads for the other two budgets
    # (deploy/env.example, the tests) still starts: half of the threads they leave.
    half_left = max(1, (threads - uploads - streams) // 2)
    downloads = r.integer("PICSTREAM_MAX_DOWNLOADS", half_left, 1, 4096)
    _check_budgets(threads, uploads + streams + downloads)
    fields = {
        "s3_public_endpoint": r.url(
            "S3_PUBLIC_ENDPOINT", r.env.get("S3_ENDPOINT") or None, ("http", "https")
        ),
        "part_size": part_size,
        "port": r.integer("PORT", 8000, 1, 65535),
        "host": r.text("PICSTREAM_HOST", "127.0.0.1"),
        "bind": r.text("PICSTREAM_BIND", ""),
        "accel_redirect": r.choice("PICSTREAM_ACCEL_REDIRECT", "0", ("0", "1")) == "1",
        "api_keys": r.api_keys("PICSTREAM_API_KEYS"),
        "max_upload_bytes": r.size(
            "PICSTREAM_MAX_UPLOAD_BYTES", 1 * GiB, 1, part_size * S3_MAX_PARTS
        ),
        "max_pixels": r.integer("PICSTREAM_MAX_PIXELS", 100_000_000, 1, 2**40),
        "max_head_bytes": r.size("PICSTREAM_MAX_HEAD_BYTES", 2 * MiB, 64 * 1024, part_size),
        "allowed_formats": r.formats("PICSTREAM_ALLOWED_FORMATS"),
        "read_timeout": r.seconds("PICSTREAM_READ_TIMEOUT", 30.0),
        "web_workers": r.integer("PICSTREAM_WEB_WORKERS", 2, 1, 256),
        "web_threads": threads,
        "max_uploads": uploads,
        "max_event_streams": streams,
        "max_downloads": downloads,
        "sse_heartbeat": r.seconds("PICSTREAM_SSE_HEARTBEAT", 15.0),
        "send_timeout": r.seconds("PICSTREAM_SEND_TIMEOUT", 30.0),
        "signing_key": r.secret("PICSTREAM_SIGNING_KEY"),
        "presign_seconds": r.integer("PICSTREAM_PRESIGN_SECONDS", 300, 1, 7 * 86_400),
        "lease_seconds": r.seconds("PICSTREAM_LEASE_SECONDS", 15.0),
        "cors_origins": r.origins("PICSTREAM_CORS_ORIGINS"),
        "signed_cache_public": r.choice("PICSTREAM_SIGNED_CACHE", "private", _CACHE) == "public",
        "tus_expiry": r.seconds("PICSTREAM_TUS_EXPIRY", 12 * 3600.0, high=TUS_MAX_EXPIRY),
    }
    return fields | _tokens(r)


def _tokens(r: _Reader) -> dict[str, Any]:
    ttl = r.integer("PICSTREAM_TOKEN_TTL", 3600, 1, 7 * 86_400)
    max_ttl = r.integer("PICSTREAM_TOKEN_MAX_TTL", 86_400, 1, 7 * 86_400)
    uploads = r.integer("PICSTREAM_TOKEN_UPLOADS", 1, 1, 1_000_000)
    max_uploads = r.integer("PICSTREAM_TOKEN_MAX_UPLOADS", 1000, 1, 1_000_000)
    if ttl > max_ttl:
        raise ConfigError("PICSTREAM_TOKEN_TTL must not exceed PICSTREAM_TOKEN_MAX_TTL")
    if uploads > max_uploads:
        raise ConfigError("PICSTREAM_TOKEN_UPLOADS must not exceed PICSTREAM_TOKEN_MAX_UPLOADS")
    return {
        "token_ttl": ttl,
        "token_max_ttl": max_ttl,
        "token_uploads": uploads,
        "token_max_uploads": max_uploads,
    }


def _conversion(r: _Reader) -> dict[str, Any]:
    return {
        "max_pixels": r.integer("PICSTREAM_MAX_PIXELS", 100_000_000, 1, 2**40),
        "max_frames": r.integer("PICSTREAM_MAX_FRAMES", 100, 1, 10_000),
        "convert_threads": r.integer("PICSTREAM_CONVERT_THREADS", 2, 1, 64),
        "job_memory": r.size("PICSTREAM_JOB_MEMORY", 1 * GiB, 0, 1024 * GiB),
    }


def _janitor(r: _Reader) -> dict[str, Any]:
    return {"janitor_interval": r.seconds("PICSTREAM_JANITOR_INTERVAL", 300.0)}


def _webhook_hosts(r: _Reader) -> dict[str, Any]:
    return {"webhook_hosts": r.hosts("PICSTREAM_WEBHOOK_HOSTS")}


def _webhooks(r: _Reader) -> dict[str, Any]:
    hosts = r.hosts("PICSTREAM_WEBHOOK_HOSTS")
    secret = r.secret("PICSTREAM_WEBHOOK_SECRET")
    owner_urls = r.owner_urls("PICSTREAM_WEBHOOKS")
    _check_webhooks(hosts, secret, owner_urls)
    return {
        "webhook_hosts": hosts,
        "webhook_secret": secret,
        "owner_webhooks": owner_urls,
        "webhook_retry_intervals": r.intervals(
            "PICSTREAM_WEBHOOK_RETRY_INTERVALS", (10, 30, 120, 600, 1800, 3600)
        ),
    }


def _metrics(r: _Reader) -> dict[str, Any]:
    web = r.integer("PICSTREAM_METRICS_PORT", 0, 0, 65535)
    worker = r.integer("PICSTREAM_WORKER_METRICS_PORT", 0, 0, 65535)
    if web and str(web) == r.env.get("PORT", "8000").strip():
        raise ConfigError("PICSTREAM_METRICS_PORT must differ from PORT (the public API)")
    if web and web == worker:
        raise ConfigError("PICSTREAM_WORKER_METRICS_PORT must differ from PICSTREAM_METRICS_PORT")
    return {
        "metrics_port": web,
        "worker_metrics_port": worker,
        "metrics_host": r.text("PICSTREAM_METRICS_HOST", "127.0.0.1"),
        "metrics_dir": r.text("PICSTREAM_METRICS_DIR", ""),
    }


_READERS: dict[Concern, Callable[[_Reader], dict[str, Any]]] = {
    Concern.STORAGE: _storage,
    Concern.JOBS: _jobs,
    Concern.PROFILES: _profiles,
    Concern.WEB: _web,
    Concern.CONVERSION: _conversion,
    Concern.JANITOR: _janitor,
    Concern.WEBHOOK_HOSTS: _webhook_hosts,
    Concern.WEBHOOKS: _webhooks,
    Concern.METRICS: _metrics,
}


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Where state lives: the S3 bucket (originals, variants, record copies) and Redis
    (records, index, queues), and the janitor that tidies both."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    bucket: str
    region: str
    redis_url: str
    redis_timeout: float
    janitor_interval: float


@dataclass(frozen=True, slots=True)
class WebSettings:
    """The API process: where it listens, who may call it, what it accepts, and the
    thread budgets of its slow requests."""

    public_endpoint: str  # the store as clients see it, for presigned redirects
    part_size: int  # multipart part size of uploads
    port: int
    host: str
    bind: str
    accel_redirect: bool
    api_keys: tuple[tuple[str, str], ...] = field(repr=False)
    max_upload_bytes: int
    max_pixels: int
    max_head_bytes: int
    allowed_formats: frozenset[str]
    read_timeout: float
    workers: int
    threads: int
    max_uploads: int
    max_event_streams: int
    max_downloads: int
    sse_heartbeat: float
    send_timeout: float
    signing_key: bytes | None = field(repr=False)
    presign_seconds: int
    lease_seconds: float
    cors_origins: frozenset[str]
    signed_cache_public: bool
    token_ttl: int
    token_max_ttl: int
    token_uploads: int
    token_max_uploads: int
    tus_expiry: float


@dataclass(frozen=True, slots=True)
class ConversionSettings:
    """The conversion jobs: their queues (fresh uploads, bulk reconversion), limits and
    retries, and the profiles."""

    queue: str
    bulk_queue: str
    job_timeout: int
    profiles: Profiles = field(repr=False)
    profiles_path: str  # "" for the built-in profiles
    max_pixels: int
    max_frames: int
    threads: int  # variants encoded at once within a job
    retry_intervals: tuple[int, ...]
    job_memory: int  # RLIMIT_DATA of one conversion process; 0 = none


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Webhook deliveries: who may be called, how they are signed, the owners' default
    URLs, the retry waits and the queue deliveries wait on."""

    hosts: frozenset[str]
    secret: bytes | None = field(repr=False)
    owner_urls: tuple[tuple[str, str], ...]
    retry_intervals: tuple[int, ...]
    queue: str


def _check_budgets(threads: int, budgets: int) -> None:
    if budgets >= threads:
        raise ConfigError(
            "PICSTREAM_MAX_UPLOADS + PICSTREAM_MAX_EVENT_STREAMS + PICSTREAM_MAX_DOWNLOADS"
            f" ({budgets}) must leave threads free for other requests: raise"
            f" PICSTREAM_WEB_THREADS ({threads}) above {budgets}"
        )


def _check_webhooks(
    hosts: frozenset[str], secret: bytes | None, owner_urls: tuple[tuple[str, str], ...]
) -> None:
    if (owner_urls or hosts) and secret is None:
        raise ConfigError("webhooks need PICSTREAM_WEBHOOK_SECRET to sign deliveries")
    for owner, url in owner_urls:
        try:
            listed = host_allowed(url, hosts)
        except InvalidWebhookUrl as exc:
            raise ConfigError(f"PICSTREAM_WEBHOOKS: the URL for {owner!r}: {exc.detail}") from None
        if not listed:
            raise ConfigError(
                f"PICSTREAM_WEBHOOKS: the URL for {owner!r} is not on PICSTREAM_WEBHOOK_HOSTS"
            )


def _check_queues(queue: str, bulk_queue: str, webhook_queue: str) -> None:
    """One queue per kind of job: workers drain them in order (fresh uploads, webhook
    deliveries, bulk reconversion), which a shared name would undo."""
    if queue == bulk_queue:
        raise ConfigError("PICSTREAM_BULK_QUEUE must differ from PICSTREAM_QUEUE")
    if webhook_queue in (queue, bulk_queue):
        raise ConfigError(
            "PICSTREAM_WEBHOOK_QUEUE must differ from PICSTREAM_QUEUE and PICSTREAM_BULK_QUEUE"
        )


SENTINEL_SCHEME = "redis+sentinel"
_SENTINEL_FORM = f"{SENTINEL_SCHEME}://[[user]:password@]host:port[,host:port...]/master-name[/db]"


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A REDIS_URL naming Sentinels: where they are, the master's name, the database, and
    the credentials of the master and its replicas (the Sentinels are asked without)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def sentinel_target(url: str, name: str = "REDIS_URL") -> SentinelTarget | None:
    """`redis+sentinel://[[user]:password@]host:port,host:port/master-name[/db]` parsed
    (port 26379 when left out; IPv6 hosts in brackets), None for any other scheme; a
    ConfigError naming `name` when it is malformed (never repeating the password)."""
    scheme, sep, rest = url.partition("://")
    if scheme != SENTINEL_SCHEME or not sep:
        return None
    location, _, path = rest.partition("/")
    credentials, at, hosts = location.rpartition("@")
    service, _, db = path.partition("/")
    if "?" in path or "#" in path:
        raise ConfigError(f"{name}: query and fragment are not supported: {_SENTINEL_FORM}")
    if not service:
        raise ConfigError(f"{name} must name the master: {_SENTINEL_FORM}")
    if db and not re.fullmatch(r"[0-9]{1,5}", db):
        raise ConfigError(f"{name}: the database must be a number: {_SENTINEL_FORM}")
    username, _, password = credentials.partition(":") if at else ("", "", "")
    return SentinelTarget(
        sentinels=tuple(_host_port(item, name) for item in hosts.split(",")),
        service=unquote(service),
        db=int(db or 0),
        username=unquote(username) or None,
        password=unquote(password) or None,
    )


def _host_port(item: str, name: str) -> tuple[str, int]:
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::([0-9]{1,5}))?", item.strip())
    if match is None:
        raise ConfigError(
            f"{name}: {item.strip()!r} is not a Sentinel host:port ({_SENTINEL_FORM})"
        )
    port = int(match[2] or 26379)
    if not 0 < port < 65536:
        raise ConfigError(f"{name}: Sentinel port {port} is out of range")
    return match[1].strip("[]"), port


_SIZE_SUFFIXES = {"": 1, "k": 1024, "kib": 1024, "m": MiB, "mib": MiB, "g": GiB, "gib": GiB}


class _Reader:
    """Typed accessors over the environment; each error names its variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def _raw(self, name: str, default: str | None) -> str:
        value = self.env.get(name, "").strip()
        if value:
            return value
        if default is None:
            raise ConfigError(f"{name} is required but not set")
        return default

    def text(self, name: str, default: str | None) -> str:
        return self._raw(name, default)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        raw = self._raw(name, str(default))
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def size(self, name: str, default: int, low: int, high: int) -> int:
        """A byte count, optionally with a binary suffix: 16MiB, 5m, 1GiB."""
        raw = self._raw(name, str(default))
        match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", raw)
        unit = match and _SIZE_SUFFIXES.get(match.group(2).lower())
        if not match or unit is None:
            raise ConfigError(f"{name} must be a byte count like 16777216 or 16MiB, got {raw!r}")
        value = int(match.group(1)) * unit
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high} bytes, got {value}")
        return value

    def seconds(self, name: str, default: float, high: float = 86_400) -> float:
        raw = self._raw(name, str(default))
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
        if not 0 < value <= high:
            raise ConfigError(f"{name} must be between 0 and {high:g} seconds, got {value}")
        return value

    def origins(self, name: str) -> frozenset[str]:
        """Comma-separated exact origins (`https://app.example.com`, `http://127.0.0.1:3000`),
        or `*`. An origin has no path, query or trailing slash: browsers send it that way."""
        found = set()
        for item in self.env.get(name, "").split(","):
            origin = item.strip()
            if not origin:
                continue
            if origin != "*" and not re.fullmatch(
                r"https?://([a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:]+\])(:\d{1,5})?", origin
            ):
                raise ConfigError(
                    f"{name}: {origin!r} is not an origin like https://app.example.com"
                    " (lower case, no path, no trailing slash) or *"
                )
            found.add(origin)
        return frozenset(found)

    def url(self, name: str, default: str | None, schemes: tuple[str, ...]) -> str:
        raw = self._raw(name, default)
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix"):
            raise ConfigError(f"{name} must be a {'/'.join(schemes)} URL, got {raw!r}")
        return raw

    def redis_url(self, name: str, default: str) -> str:
        """redis://, rediss://, unix:// or redis+sentinel:// (`sentinel_target`). The
        message never repeats the URL: it may hold a password."""
        raw = self._raw(name, default)
        parts = urlsplit(raw)
        if parts.scheme == SENTINEL_SCHEME:
            sentinel_target(raw, name)
        elif parts.scheme not in ("redis", "rediss", "unix") or not (
            parts.netloc or parts.scheme == "unix"
        ):
            raise ConfigError(
                f"{name} must be a redis://, rediss://, unix:// or {SENTINEL_SCHEME}:// URL"
            )
        return raw

    def bucket(self, name: str, default: str) -> str:
        raw = self._raw(name, default)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", raw):
            raise ConfigError(f"{name} is not a valid S3 bucket name: {raw!r}")
        return raw

    def name(self, name: str, default: str) -> str:
        raw = self._raw(name, default)
        if not QUEUE_RE.fullmatch(raw):
            raise ConfigError(f"{name} must match {QUEUE_RE.pattern}, got {raw!r}")
        return raw

    def choice(self, name: str, default: str, options: tuple[str, ...]) -> str:
        raw = self._raw(name, default).lower()
        if raw not in options:
            raise ConfigError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
        return raw

    def formats(self, name: str) -> frozenset[str]:
        raw = self._raw(name, ",".join(DEFAULT_FORMATS))
        chosen = {f.strip().lower() for f in raw.split(",") if f.strip()}
        unknown = chosen - set(DEFAULT_FORMATS)
        if unknown or not chosen:
            raise ConfigError(
                f"{name} must be a comma-separated subset of {', '.join(DEFAULT_FORMATS)}"
                f" (the formats the workers decode); unknown: {', '.join(sorted(unknown))}"
            )
        return frozenset(chosen)

    def profiles(self, name: str) -> Profiles:
        path = self.env.get(name, "").strip()
        if not path:
            return default_profiles()
        try:
            return load_profiles(path)
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path!r}: {exc.strerror}") from None
        except (ProfileError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{name}: {exc}") from None

    def intervals(self, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """Comma-separated whole seconds, one per retry: `5,20,60,180`."""
        raw = self._raw(name, ",".join(map(str, default)))
        try:
            values = tuple(int(v) for v in raw.split(","))
        except ValueError:
            raise ConfigError(f"{name} must be whole seconds like 5,20,60, got {raw!r}") from None
        if not 1 <= len(values) <= 20 or not all(0 <= v <= 86_400 for v in values):
            raise ConfigError(f"{name} must list 1-20 waits of 0-86400 seconds, got {raw!r}")
        return values

    def hosts(self, name: str) -> frozenset[str]:
        """Comma-separated host or host:port names."""
        raw = self.env.get(name, "")
        hosts = frozenset(h.strip().lower() for h in raw.split(",") if h.strip())
        for host in hosts:
            if not re.fullmatch(r"[a-z0-9.-]+(:\d{1,5})?|\[[0-9a-f:]+\](:\d{1,5})?", host):
                raise ConfigError(f"{name}: {host!r} is not a host or host:port")
        return hosts

    def owner_urls(self, name: str) -> tuple[tuple[str, str], ...]:
        """`owner=url,owner=url`."""
        pairs = []
        for item in self.env.get(name, "").split(","):
            if not item.strip():
                continue
            owner, sep, url = item.strip().partition("=")
            if (
                not sep
                or not OWNER_RE.fullmatch(owner)
                or urlsplit(url).scheme
                not in (
                    "http",
                    "https",
                )
            ):
                raise ConfigError(f"{name} entries must be owner=http(s)://host/path")
            pairs.append((owner, url))
        return tuple(pairs)

    def secret(self, name: str) -> bytes | None:
        raw = self.env.get(name, "").strip()
        if not raw:
            return None
        if len(raw) < 32:
            raise ConfigError(f"{name} must be at least 32 characters (it keys an HMAC)")
        return raw.encode()

    def api_keys(self, name: str) -> tuple[tuple[str, str], ...]:
        """`owner:key,owner:key`; an owner may appear more than once. Errors never echo a key."""
        keys: dict[str, str] = {}  # key -> owner
        for n, item in enumerate(self.env.get(name, "").split(","), start=1):
            item = item.strip()
            if not item:
                continue
            owner, sep, key = item.partition(":")
            if not sep or not OWNER_RE.fullmatch(owner):
                raise ConfigError(
                    f"{name} entry {n} must be owner:key with owner matching {OWNER_RE.pattern}"
                )
            if len(key) < MIN_KEY_LENGTH or not key.isprintable() or " " in key:
                raise ConfigError(
                    f"{name} entry {n} (owner {owner!r}): the key must be at least"
                    f" {MIN_KEY_LENGTH} printable characters without spaces"
                )
            if key in keys:
                raise ConfigError(f"{name} entry {n}: this key is listed twice")
            keys[key] = owner
        return tuple((owner, key) for key, owner in keys.items())

"""Every Prometheus metric picstream exports, in one place, and how a process tree exports them.

Names follow Prometheus' conventions (`picstream_…_total` counters, `_seconds`, `_bytes`) and
every label has a bounded set of values: route templates, never raw paths (an unknown path is
`unmatched`); problem types, never details; operations named in our code, never keys; formats
and variant sizes from the profiles; queue names from the settings. The README's metrics
section lists them with their meaning.

Multiprocess mode: the web runs N gunicorn workers and each `python -m worker` forks a
work-horse per job, so every process writes its samples to files in one directory per process
tree (core/metrics_dir.py prepares it before this module is first imported there) and the
tree's exporter sums the files at each scrape (`tree_registry`). Gauges say how they add up
across processes (`multiprocess_mode`): slots and watchers sum the live processes only, so a
dead worker's slots are not counted for ever. When a process of the tree ends,
`retire_process` drops its live gauges and folds its counters and histograms into one
archive file per type: rq forks a work-horse per job, and without the folding the directory
(and every scrape) would grow by a few files per job, for ever.
"""

from __future__ import annotations

import fcntl
import glob
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from redis import Redis
from rq.registry import ScheduledJobRegistry

from core.metrics_dir import ENV

# ---------------------------------------------------------------------- label bounding

UNMATCHED = "unmatched"  # the route of a request no route template matched
OTHER = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,47}")
_FORMAT = re.compile(r"[a-z0-9]{1,16}")


def method_label(method: str) -> str:
    """The request method, or `other` for anything a client made up."""
    return method if method in METHODS else OTHER


def status_label(status: int | str) -> str:
    """The three-digit status code."""
    code = str(status)[:3]
    return code if code.isdigit() and len(code) == 3 else OTHER


def slug_label(slug: str) -> str:
    """A problem type slug (`too-large`), or `other` for anything that is not one."""
    return slug if _SLUG.fullmatch(slug) else OTHER


def format_label(fmt: str) -> str:
    return fmt if _FORMAT.fullmatch(fmt) else OTHER


# ---------------------------------------------------------------------- the web process

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

REQUESTS = Counter(
    "picstream_http_requests",
    "HTTP requests answered by the API, by route template, method and status.",
    ["route", "method", "status"],
)
REQUEST_DURATION = Histogram(
    "picstream_http_request_duration_seconds",
    "Time from a request reaching the application to its response being handed to the server"
    " (a streamed body, a download's or an event stream's, is not included).",
    ["route", "method"],
    buckets=(*_FAST, 30.0, 60.0, 300.0),
)
UPLOADS_ACCEPTED = Counter(
    "picstream_uploads_accepted",
    "Uploads committed: a new image recorded and its conversion queued (POST, PUT, tus).",
)
UPLOAD_BYTES = Counter(
    "picstream_upload_bytes",
    "Bytes of the originals of accepted uploads.",
)
UPLOADS_REJECTED = Counter(
    "picstream_uploads_rejected",
    "Upload requests answered with a problem, by its type (the slug of the problem's `type`).",
    ["problem"],
)
UPLOAD_DURATION = Histogram(
    "picstream_upload_duration_seconds",
    "Upload requests (POST/PUT of an image, tus PATCH) from start to answer, by outcome.",
    ["outcome"],
    buckets=_SLOW,
)
DOWNLOAD_BYTES = Counter(
    "picstream_download_bytes",
    "Bytes of the download answers the web process relays itself (their Content-Length);"
    " hand-offs to nginx and redirects to the store are not counted.",
    ["route"],
)
SLOTS_IN_USE = Gauge(
    "picstream_slots_in_use",
    "Slots held by uploads, event streams and downloads (api/limits.py), all web processes.",
    ["kind"],
    multiprocess_mode="livesum",
)
SLOTS_LIMIT = Gauge(
    "picstream_slots_limit",
    "Slots there are for each kind, all live web processes together.",
    ["kind"],
    multiprocess_mode="livesum",
)
SLOT_REJECTIONS = Counter(
    "picstream_slot_rejections",
    "Requests refused with 503 busy because every slot of their kind was taken.",
    ["kind"],
)
SSE_WATCHERS = Gauge(
    "picstream_sse_watchers",
    "Event streams following a conversion live (waiting for its next event).",
    multiprocess_mode="livesum",
)

# ---------------------------------------------------------------------- the stores (everyone)

S3_DURATION = Histogram(
    "picstream_s3_request_duration_seconds",
    "S3 calls by operation (core/storage.py), failed ones included; a download's body is"
    " read in several calls.",
    ["operation"],
    buckets=(*_FAST, 30.0, 60.0),
)
S3_ERRORS = Counter(
    "picstream_s3_errors",
    "S3 calls that failed (store unreachable or an error answer; not found is no error).",
    ["operation"],
)
REDIS_DURATION = Histogram(
    "picstream_redis_operation_duration_seconds",
    "Redis operations by name (core/records.py `redis_errors`): records, index, tokens, tus.",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, *_FAST),
)
REDIS_ERRORS = Counter(
    "picstream_redis_errors",
    "Redis operations that failed (connection, timeout, error reply).",
    ["operation"],
)

# ---------------------------------------------------------------------- the workers

JOBS_STARTED = Counter(
    "picstream_jobs_started",
    "Jobs a work-horse started, by queue.",
    ["queue"],
)
JOBS_FINISHED = Counter(
    "picstream_jobs_finished",
    "Job attempts ended, by queue and outcome: succeeded, retried (failed with a retry"
    " left) or failed (for good).",
    ["queue", "outcome"],
)
CONVERSIONS = Counter(
    "picstream_conversions",
    "Conversions that reached a final state, by outcome: ready (every variant made) or"
    " failed (a bad original, a variant the encoder refused, or retries used up).",
    ["outcome"],
)
CONVERSION_DURATION = Histogram(
    "picstream_conversion_duration_seconds",
    "A conversion job's work, from downloading the original to its final record, by the"
    " original's format.",
    ["format"],
    buckets=_SLOW,
)
VARIANT_DURATION = Histogram(
    "picstream_variant_encode_duration_seconds",
    "Encoding one variant, by its format and size (the profile's size name: w1024, 256x256).",
    ["format", "size"],
    buckets=(*_FAST, 30.0, 60.0),
)
VARIANT_BYTES = Counter(
    "picstream_variant_bytes",
    "Bytes of the variants stored, by format and size.",
    ["format", "size"],
)
WEBHOOK_DELIVERIES = Counter(
    "picstream_webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered (2xx), refused (another status),"
    " unreachable (no answer), not_sent (a URL no longer allowed or no signing key).",
    ["outcome"],
)
JANITOR_ACTIONS = Counter(
    "picstream_janitor_actions",
    "What the janitor's sweeps did: aborted_abandoned_upload (its process died),"
    " aborted_stale_upload (unregistered, over a day old), purged_prefix,"
    " requeued_lost_conversion, requeued_lost_delivery (rq lost the job: core/inflight.py).",
    ["action"],
)


# ---------------------------------------------------------------------- small recorders


class SlotMetrics:
    """The metrics of one budget of slots (api/limits.py)."""

    def __init__(self, what: str, limit: int) -> None:
        kind = what.replace(" ", "_")
        SLOTS_LIMIT.labels(kind).set(limit)
        self.in_use = SLOTS_IN_USE.labels(kind)
        self.rejections = SLOT_REJECTIONS.labels(kind)


def upload_accepted(size: int) -> None:
    UPLOADS_ACCEPTED.inc()
    UPLOAD_BYTES.inc(size)


def janitor_swept(
    abandoned: int, stale: int, purged: int, requeued: int = 0, redelivered: int = 0
) -> None:
    JANITOR_ACTIONS.labels("aborted_abandoned_upload").inc(abandoned)
    JANITOR_ACTIONS.labels("aborted_stale_upload").inc(stale)
    JANITOR_ACTIONS.labels("purged_prefix").inc(purged)
    JANITOR_ACTIONS.labels("requeued_lost_conversion").inc(requeued)
    JANITOR_ACTIONS.labels("requeued_lost_delivery").inc(redelivered)


# ---------------------------------------------------------------------- export


def shared() -> bool:
    """Whether this process records into the tree's directory (prometheus_client was first
    imported with PROMETHEUS_MULTIPROC_DIR set). False in a process that imported it too
    early: its samples would be in its own memory, which no scrape sees. (prometheus_client
    has no public way to ask; tests/unit/test_metrics.py fails if this one stops working.)"""
    return type(REQUESTS.labels("", "", "")._value).__name__ != "MutexValue"


class TreeCollector(Collector):
    """MultiProcessCollector over the tree's directory, reading under a shared lock that
    `retire_process` takes exclusively: a scrape never sees a dead process's samples both in
    its own files and in the archive (a counter jumping up, then back down)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def collect(self) -> Iterable[Metric]:
        with _locked(self.path, fcntl.LOCK_SH):
            files = glob.glob(os.path.join(self.path, "*.db"))
            merged = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
            return list(merged)


class QueueDepth(Collector):
    """Jobs waiting in each queue and jobs scheduled for a retry, asked of Redis at each
    scrape. A Redis that does not answer leaves the two metrics out of that scrape."""

    def __init__(self, redis: Redis, queues: Sequence[str]) -> None:
        # Imported here: core.jobs leads (through core.records) back to this module.
        from core.jobs import make_queue

        self.queues = [make_queue(redis, name, 60) for name in queues]

    def collect(self) -> Iterable[Metric]:
        depth = GaugeMetricFamily(
            "picstream_queue_depth",
            "Jobs waiting in the queue (asked at scrape).",
            labels=["queue"],
        )
        scheduled = GaugeMetricFamily(
            "picstream_queue_scheduled_jobs",
            "Jobs of the queue waiting for a retry's due time (asked at scrape).",
            labels=["queue"],
        )
        try:
            for queue in self.queues:
                depth.add_metric([queue.name], queue.count)
                registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
                scheduled.add_metric([queue.name], registry.count)
        except Exception:  # noqa: BLE001 - a scrape must answer without them
            return []
        return [depth, scheduled]


def tree_registry(path: str | Path, *extra: Collector) -> CollectorRegistry:
    """What the exporter of a process tree serves: the sum of the tree's files, and `extra`
    collectors asked at scrape time."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TreeCollector(path))
    for collector in extra:
        registry.register(collector)
    return registry


def serve(host: str, port: int, registry: CollectorRegistry) -> WSGIServer:
    """Serve `registry` on host:port (any path; Prometheus asks for /metrics) from a daemon
    thread; OSError when the port is taken."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def retire_process(pid: int) -> None:
    """A process of this tree has ended: drop its live gauges, and fold its counters and
    histograms into the tree's archive files (see the module docstring)."""
    path = os.environ.get(ENV)
    if not path:
        return
    mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    with _locked(path, fcntl.LOCK_EX):
        for kind in ("counter", "histogram"):
            dead = os.path.join(path, f"{kind}_{pid}.db")
            if os.path.exists(dead):
                _fold(os.path.join(path, f"{kind}_archive.db"), dead)


def _fold(archive: str, dead: str) -> None:
    """Add the samples of `dead` to `archive`, written anew and renamed into place."""
    sums: dict[str, float] = defaultdict(float)
    for source in (archive, dead):
        if os.path.exists(source):
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(source):  # type: ignore[no-untyped-call]
                sums[key] += value
    fresh = archive.removesuffix(".db") + ".tmp"  # not *.db: no scrape reads it half-written
    with closing(MmapedDict(fresh)) as out:  # type: ignore[no-untyped-call]
        for key, value in sums.items():
            out.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
    os.replace(fresh, archive)
    os.unlink(dead)


@contextmanager
def _locked(path: str, how: int) -> Iterator[None]:
    with open(os.path.join(path, ".lock"), "a+b") as lock:
        fcntl.flock(lock, how)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

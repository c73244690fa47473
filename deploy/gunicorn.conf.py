"""gunicorn settings for the web process (`Procfile` web entry).

- gthread, not sync: the sync worker kills any request longer than `timeout` by raising
  SystemExit inside it, which would cut large uploads and event streams. gthread's `timeout`
  only watches the worker's heartbeat.
- Request bodies get a read timeout in the handler (api/body.py), not here: gunicorn has none.
- The app is loaded in each worker after fork (no preload), so the minio client and its
  connection pool (sized to the thread count) are built per process.
- It belongs behind nginx (deploy/nginx.conf): gthread reads request headers and writes
  responses on its request threads, so slow clients facing it directly pin every thread.
  PICSTREAM_BIND is where it listens then (a unix socket or a loopback port only nginx uses).
"""

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from api.gunicorn_logging import gunicorn_logger
from core.logs import bind_request_id
from core.settings import WEB_PROCESS, ConfigError, Settings

# Every setting the web process uses is checked here, in the master, before any worker
# starts: a bad one stops gunicorn with one line naming it (raised from a worker's app(), it
# would be a traceback per worker). Settings only the conversion workers use are not read.
try:
    _settings = Settings.from_env(os.environ, WEB_PROCESS)
except ConfigError as exc:
    print(f"web: {exc}", file=sys.stderr)
    sys.exit(2)

bind = [_settings.bind or f"{_settings.host}:{_settings.port}"]
worker_class = "gthread"
workers = _settings.web_workers
threads = _settings.web_threads
# Connections beyond the threads wait in the accept backlog instead of being refused.
worker_connections = 4 * _settings.web_threads
timeout = 60
# A deploy/restart waits this long for in-flight uploads before cutting them. (Under
# `make run`, honcho SIGKILLs the web 5 s after the first Procfile process has exited, whatever
# this says; deploy/devstack.py then aborts the multipart uploads it cut.)
graceful_timeout = 120
keepalive = 5
preload_app = False
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
# The query string may carry signatures: log the path only. Behind nginx the client's address
# is in X-Forwarded-For (set by nginx, never appended to).
access_log_format = '%(h)s %({x-forwarded-for}i)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
# Our format (PICSTREAM_LOG_FORMAT) and scrubbing on gunicorn's error and access logs, each
# line with the request's id (api/gunicorn_logging.py).
logger_class = gunicorn_logger(_settings.log_format)

# The forwarding headers are believed only from the proxy: a loopback peer or the unix socket
# (gunicorn always trusts a unix socket's peer). Only X-Forwarded-Proto sets the scheme; with
# gunicorn's default list a client-sent X-Forwarded-Ssl contradicting it was a 400.
forwarded_allow_ips = "127.0.0.1,::1"
secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}
# Above what nginx lets through (8 KiB lines, 4 x 8 KiB of header), so every oversize
# request is refused by nginx as problem+json, never by gunicorn with a text/html page.
limit_request_line = 8190
limit_request_field_size = 8190
limit_request_fields = 8192

# Requests reach the app with X-Picstream-Accel-Redirect: 1 exactly when
# PICSTREAM_ACCEL_REDIRECT=1 (api/downloads.py then hands downloads to nginx); a copy sent by
# a client is dropped, so no client can choose how its download is served.
ACCEL_HEADER = "X-PICSTREAM-ACCEL-REDIRECT"


def pre_request(worker: object, req: Any) -> None:
    req.headers = [(name, value) for name, value in req.headers if name != ACCEL_HEADER]
    if _settings.accel_redirect:
        req.headers.append((ACCEL_HEADER, "1"))


# glibc raises its mmap threshold after the first large free, so later part buffers (16 MiB)
# come from per-thread heaps that are never given back: measured, the worker's RSS crept up by
# about a part per upload (bench/upload.py). A fixed threshold keeps every part buffer an mmap
# of its own, returned to the system when the upload ends.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def post_fork(server: object, worker: object) -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
    _metrics.forked()


class _Metrics:
    """The web's metrics (core/metrics.py) with PICSTREAM_METRICS_PORT set: the workers record
    into one multiprocess directory, and the master serves their sum on a listener of its own
    (PICSTREAM_METRICS_HOST, loopback by default), never on the public port.

    - `on_starting` (once, in the master, before any worker): empty the directory and export
      it (core/metrics_dir.py), then load prometheus_client, which nothing in this file may
      have loaded before (checked: it would have chosen in-memory counting for every worker),
      and start the listener. A taken port stops gunicorn with one line.
    - `post_fork` (in each worker): close the worker's copy of the listening socket, so only
      the master holds the port.
    - `child_exit` (in the master): a worker has died; its live gauges (slots, watchers) are
      dropped and its counters folded into the archive.
    - `on_exit`: stop the listener; remove the directory if it was a temporary one.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: Any = None
        self.tree: Any = None

    def start(self) -> None:
        port = self.settings.metrics_port
        if not port:
            return
        if "prometheus_client" in sys.modules:
            print("web: prometheus_client was loaded before its directory was set", file=sys.stderr)
            sys.exit(2)
        from core import metrics_dir

        self.tree = metrics_dir.prepare(self.settings.metrics_dir)
        from core import metrics  # only now: prometheus_client in multiprocess mode

        try:
            registry = metrics.tree_registry(self.tree.path)
            self.server = metrics.serve(self.settings.metrics_host, port, registry)
        except OSError as exc:
            self.tree.remove()
            print(f"web: PICSTREAM_METRICS_PORT {port}: {exc.strerror}", file=sys.stderr)
            sys.exit(2)

    def forked(self) -> None:
        if self.server is not None:
            self.server.socket.close()

    def child_exited(self, pid: int) -> None:
        if self.server is not None:
            from core import metrics

            metrics.retire_process(pid)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.tree is not None:
            self.tree.remove()


_metrics = _Metrics(_settings)


def on_starting(server: object) -> None:
    _metrics.start()


def child_exit(server: object, worker: Any) -> None:
    _metrics.child_exited(worker.pid)


def on_exit(server: object) -> None:
    _metrics.stop()


def post_request(worker: object, req: Any, environ: object, resp: object) -> None:
    # After the access line: the thread's next lines belong to no request until the app
    # binds the next id (api/requestid.py).
    bind_request_id(None)

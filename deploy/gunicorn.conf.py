"""gunicorn settings for the web process (`Procfile` web entry).

- gthread, not sync: the sync worker kills any request longer than `timeout` by raising
  SystemExit inside it, which would cut large uploads and event streams. gthread's `timeout`
  only watches the worker's heartbeat.
- Request bodies get a read timeout in the handler (api/body.py), not here: gunicorn has none.
- The app is loaded in each worker after fork (no preload), so the minio client and its
  connection pool (sized to the thread count) are built per process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from core.settings import Settings

_settings = Settings.from_env(os.environ)

bind = [f"{_settings.host}:{_settings.port}"]
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
# The query string may carry signatures in later versions: log the path only.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'

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

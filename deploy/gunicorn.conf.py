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
# A deploy/restart waits this long for in-flight uploads before cutting them.
graceful_timeout = 120
keepalive = 5
preload_app = False
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = _settings.log_level
# The query string may carry signatures in later versions: log the path only.
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'

"""prometheus_client's multiprocess directory, made ready before prometheus_client is loaded.

prometheus_client picks its storage once, when it is first imported: with
PROMETHEUS_MULTIPROC_DIR in the environment every process writes its samples to files
there (one set per pid) and an exporter sums them; without, each process counts in its own
memory, which a scrape of one gunicorn worker or one rq work-horse would show alone. So the
root of each process tree — gunicorn's master (deploy/gunicorn.conf.py `on_starting`), the
worker's supervisor (worker/metrics.py) — calls `prepare` before anything it starts imports
prometheus_client, and its children inherit the variable. This module must never import
prometheus_client itself (nor anything that does).

The directory is emptied at start: files left by an earlier run would be summed with this
run's (a counter jumping by what the last run counted). Without PICSTREAM_METRICS_DIR each
tree gets a fresh one of its own under the temporary directory, removed when it ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's name; it reads the variable itself


@dataclass(frozen=True, slots=True)
class MetricsDir:
    path: Path
    owned: bool  # made by `prepare` (a temporary directory): removed by `remove`

    def remove(self) -> None:
        """When the tree has ended: remove the directory if `prepare` made it. A configured
        one keeps its files for a look after the fact; the next start empties it."""
        if self.owned:
            shutil.rmtree(self.path, ignore_errors=True)


def prepare(configured: str) -> MetricsDir:
    """Empty (or create) the directory of this process tree and export it to the children
    through PROMETHEUS_MULTIPROC_DIR. `configured` is PICSTREAM_METRICS_DIR ("" for a fresh
    temporary directory)."""
    if configured:
        path = Path(configured).resolve()
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink(missing_ok=True)
        owned = False
    else:
        path = Path(tempfile.mkdtemp(prefix="picstream-metrics-"))
        owned = True
    # The one write to the environment: prometheus_client reads this variable on import,
    # in this process's children (gunicorn workers, the rq worker and its work-horses).
    os.environ[ENV] = str(path)
    return MetricsDir(path, owned)

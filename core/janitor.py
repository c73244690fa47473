"""Abort multipart uploads that nobody will finish.

Every failure path of an upload aborts its multipart upload, but two cannot: a web process
killed outright (SIGKILL, OOM, host crash) and an abort that fails because the store itself is
down. S3 keeps such uploads, and their parts, until they are aborted (SeaweedFS never expires
them), so this sweeps uploads older than any upload could legitimately take. It also finishes
deletions whose object removal failed (the purge list, api/serving.py).

    python -m core.janitor [--hours 24]     (every worker also runs it hourly; one at a time)
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from datetime import UTC, datetime, timedelta

import redis

from core.errors import PicstreamError
from core.records import NS, Records, connect
from core.settings import Settings
from core.storage import Store

log = logging.getLogger(__name__)

DEFAULT_AGE = timedelta(hours=24)


def abort_stale_uploads(
    store: Store, older_than: timedelta = DEFAULT_AGE, now: datetime | None = None
) -> int:
    """Abort incomplete uploads initiated before now - older_than; return how many."""
    cutoff = (now or datetime.now(UTC)) - older_than
    aborted = 0
    for upload in store.incomplete_uploads():
        if upload.initiated is None or upload.initiated > cutoff:
            continue
        try:
            store.abort_upload(upload.key, upload.upload_id)
        except PicstreamError as exc:
            log.warning("could not abort the stale upload of %s: %s", upload.key, exc.detail)
            continue
        log.info("aborted a stale upload of %s from %s", upload.key, upload.initiated)
        aborted += 1
    return aborted


def sweep_purges(store: Store, records: Records) -> int:
    """Delete the objects of images whose deletion the store failed at the time."""
    done = 0
    for prefix in records.purges():
        try:
            store.delete_prefix(prefix)
        except PicstreamError as exc:
            log.warning("purge of %s failed again: %s", prefix, exc.detail)
            continue
        records.purged(prefix)
        done += 1
    return done


def run_periodically(settings: Settings, every: float = 3600) -> threading.Thread:
    """A daemon thread that sweeps every `every` seconds, one process at a time cluster-wide
    (a Redis lock), so any number of workers can run it."""

    def loop() -> None:
        store = Store.from_settings(settings)
        records = Records(connect(settings))
        while True:
            try:
                if records.redis.set(f"{NS}:janitor", "1", nx=True, ex=int(every * 0.9)):
                    aborted = abort_stale_uploads(store)
                    purged = sweep_purges(store, records)
                    if aborted or purged:
                        log.info("janitor: %d stale uploads aborted, %d purged", aborted, purged)
            except (PicstreamError, redis.RedisError) as exc:
                log.warning("janitor run failed: %s", exc)
            time.sleep(every)

    thread = threading.Thread(target=loop, name="janitor", daemon=True)
    thread.start()
    return thread


def main() -> None:
    parser = argparse.ArgumentParser(description="Abort stale incomplete multipart uploads.")
    parser.add_argument("--hours", type=float, default=DEFAULT_AGE.total_seconds() / 3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    settings = Settings.from_env(os.environ)
    store = Store.from_settings(settings)
    count = abort_stale_uploads(store, timedelta(hours=args.hours))
    purged = sweep_purges(store, Records(connect(settings)))
    print(f"aborted {count} stale upload(s), purged {purged} deleted image(s)")


if __name__ == "__main__":
    main()

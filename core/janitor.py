"""Abort multipart uploads that nobody will finish.

Every failure path of an upload aborts its multipart upload, but two cannot: a web process
killed outright (SIGKILL, OOM, host crash) and an abort that fails because the store itself is
down. S3 keeps such uploads, and their parts, until they are aborted (SeaweedFS never expires
them), so this sweeps uploads older than any upload could legitimately take.

    python -m core.janitor [--hours 24]     (the worker also runs it every hour)
"""

from __future__ import annotations

import argparse
import logging
import os
from datetime import UTC, datetime, timedelta

from core.errors import PicstreamError
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


def main() -> None:
    parser = argparse.ArgumentParser(description="Abort stale incomplete multipart uploads.")
    parser.add_argument("--hours", type=float, default=DEFAULT_AGE.total_seconds() / 3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    store = Store.from_settings(Settings.from_env(os.environ))
    count = abort_stale_uploads(store, timedelta(hours=args.hours))
    print(f"aborted {count} stale upload(s)")


if __name__ == "__main__":
    main()

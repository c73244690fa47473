"""The janitor: finishes what failures and dead processes left behind.

Every failure path of an upload aborts its multipart upload and deletes what it wrote, but
some cannot: a web process killed outright (SIGKILL, OOM, host crash) and a store that is
down at the moment of the cleanup. One sweep:

1. aborts multipart uploads whose lease expired (core/leases.py: the uploading process
   stopped renewing it, so it is dead) — minutes after the crash, not hours;
2. aborts unregistered incomplete uploads older than a day (a process killed between
   starting a multipart upload and registering it; S3 keeps such parts for ever);
3. deletes due purges (core/records.py `Purge`): incarnations and variant sets that were
   deleted or replaced, and incarnations whose upload never committed (its process died
   after storing the original: core/leases.py), each exactly its own prefix, never an
   id's whole prefix;
4. with the worker's queues (`requeue`), queues again the conversions and webhook deliveries
   whose rq job was lost (core/inflight.py) — a Redis failover or a worker killed at the
   wrong moment.

Workers run a sweep every PICSTREAM_JANITOR_INTERVAL seconds, one at a time cluster-wide;
`picstream-admin janitor` runs one now.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from core.errors import NotFound, PicstreamError
from core.inflight import Requeue, redeliver_lost, requeue_lost
from core.leases import MULTIPART_KEY, expired_multipart
from core.records import Records
from core.storage import Store

log = logging.getLogger(__name__)

DEFAULT_AGE = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What one sweep did."""

    abandoned: int  # multipart uploads of dead processes aborted
    stale: int  # unregistered uploads older than a day aborted
    purged: int  # purges done
    requeued: int = 0  # lost conversions queued again
    redelivered: int = 0  # lost webhook deliveries queued again

    def __str__(self) -> str:
        return (
            f"{self.abandoned} abandoned and {self.stale} stale uploads aborted,"
            f" {self.purged} purges done, {self.requeued} lost conversions and"
            f" {self.redelivered} lost webhook deliveries queued again"
        )


def run_once(
    store: Store, records: Records, now: float | None = None, requeue: Requeue | None = None
) -> Sweep:
    """One sweep now (see the module docstring); `now` (epoch seconds) lets a test or an
    operator act as if later."""
    return Sweep(
        abort_abandoned_uploads(store, records, now),
        abort_stale_uploads(store),
        sweep_purges(store, records, now),
        requeue_lost(records, requeue, now) if requeue is not None else 0,
        _redeliver_lost(records, requeue, now),
    )


def _redeliver_lost(records: Records, requeue: Requeue | None, now: float | None) -> int:
    if requeue is None or requeue.redeliver is None:
        return 0
    return redeliver_lost(records.redis, requeue.redeliver, requeue.lost_after, now)


def abort_abandoned_uploads(store: Store, records: Records, now: float | None = None) -> int:
    """Abort registered multipart uploads whose lease expired."""
    aborted = 0
    now_ms = int(now * 1000) if now is not None else None
    for key, upload_id, member in expired_multipart(records.redis, now_ms):
        try:
            store.abort_upload(key, upload_id)
        except NotFound:
            pass  # completed or aborted meanwhile
        except PicstreamError as exc:
            log.warning("could not abort the abandoned upload of %s: %s", key, exc.detail)
            continue
        records.redis.zrem(MULTIPART_KEY, member)
        log.info("aborted the abandoned upload of %s", key)
        aborted += 1
    return aborted


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


def sweep_purges(store: Store, records: Records, now: float | None = None) -> int:
    """Delete the objects of due purges."""
    done = 0
    for purge in records.due_purges(now):
        try:
            if purge.flat:
                store.delete_flat(purge.prefix)
            else:
                store.delete_prefix(purge.prefix)
        except PicstreamError as exc:
            log.warning("purge of %s failed again: %s", purge.prefix, exc.detail)
            continue
        records.purged(purge, now)
        done += 1
    return done

"""The delete use case (`DELETE /v1/images/{id}`): the record first, then the files."""

from __future__ import annotations

import logging
import time

from redis.client import Pipeline

from core import events
from core.errors import QueueUnavailable, StorageUnavailable
from core.migrate import migration_keys
from core.models import ImageRecord
from core.records import Purge, Records
from core.storage import Store

log = logging.getLogger(__name__)


class Deletion:
    def __init__(self, records: Records, store: Store, job_timeout: int) -> None:
        self.records = records
        self.store = store
        self.job_timeout = job_timeout

    def delete_image(self, owner: str, image_id: str) -> bool:
        """Remove the record (a conversion in flight stops writing), then every object of
        this incarnation — never anything under another incarnation of the same id. True
        when all is gone now; False when the store failed and the objects are left to the
        janitor (the image is already gone for every client).

        A purge of the incarnation is scheduled in the same transaction for after the job
        timeout: a conversion that was mid-PUT when the record went away may still write one
        variant before it notices, and that purge removes it."""
        until = time.time() + self.job_timeout + 60

        def also(pipe: Pipeline, record: ImageRecord) -> None:
            events.append(pipe, record, events.deleted_event())
            for purge in _doomed(record, until):
                self.records.schedule_purge(purge, purge.until, pipe)

        doomed = _doomed(self.records.delete(owner, image_id, also=also), until)
        try:
            for purge in doomed:
                if purge.flat:
                    self.store.delete_flat(purge.prefix)
                else:
                    self.store.delete_prefix(purge.prefix)
        except StorageUnavailable as exc:
            log.warning(
                "deleting %s failed (%s); queued for the janitor", doomed[0].prefix, exc.detail
            )
            self._bring_forward(doomed)
            return False
        return True

    def _bring_forward(self, doomed: list[Purge]) -> None:
        """The same purges, due now (and again at their `until`)."""
        try:
            for purge in doomed:
                self.records.schedule_purge(purge, time.time())
        except QueueUnavailable as exc:
            # The purges committed with the deletion still run, only later: the image is
            # gone all the same, so the answer stays 202.
            log.warning("could not bring the purge of %s forward: %s", doomed[0].prefix, exc)


def _doomed(record: ImageRecord, until: float) -> list[Purge]:
    """What deleting `record` removes: its incarnation; for a legacy record (flat keys) also
    the copies an interrupted `migrate` made, which no record can name once it is gone."""
    keys = record.keys
    if not keys.legacy:
        return [Purge(keys.prefix, until)]
    return [Purge(keys.prefix, until, flat=True), Purge(migration_keys(record).prefix, until)]

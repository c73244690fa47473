"""The bucket copy of a record, kept in step with Redis by whoever changed the record.

Redis is the authority; the copy exists so that `picstream-admin rebuild` can bring the
records back after Redis lost its data (core/rebuild.py). It is `record.json` in the
incarnation's prefix, or, until that is first written, the committed record carried by the
original itself as object metadata (`record_metadata`): a small upload then costs one PUT,
not two, and its original and the copy of its record come into being together.

A writer changes the record in Redis first (atomically, core/records.py `update`) and then
calls `mirror_record`, which writes what Redis holds *now*, not the record that writer
made: with several writers (a PATCH, a conversion, a reconvert) the last copy written is
then never older than Redis was when its writer looked.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib

from core.errors import NotFound
from core.models import META_RECORD, ImageRecord, ObjectKeys
from core.records import Records
from core.storage import Store

log = logging.getLogger(__name__)

# Each further round means another writer changed the record while the copy was written;
# that writer mirrors it too, so giving up after a few rounds loses nothing.
_ROUNDS = 5

# The encoded record an original may carry. S3 (AWS) allows 2 KB of user metadata per object
# in all, names included; the original's other fields take about 250 bytes.
_CARRIED_MAX = 1536
# A carried record is a few KiB at most once inflated; anything longer is not ours.
_INFLATED_MAX = 64 * 1024


def record_metadata(record: ImageRecord) -> dict[str, str]:
    """The record as metadata for its original's PUT, or {} when it must go to `record.json`
    instead: when it holds what only its owner may read (a webhook URL, metadata) —
    whoever may fetch the original may see its metadata (a presigned `?redirect=1` link
    goes straight to the store) — or when it does not fit."""
    # SECURITY: only fields every reader of the original may see travel with it.
    if record.callback is not None or record.metadata:
        return {}
    raw = json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True).encode()
    value = base64.b64encode(zlib.compress(raw)).decode("ascii")
    return {META_RECORD: value} if len(value) <= _CARRIED_MAX else {}


def read_copy(store: Store, keys: ObjectKeys) -> ImageRecord:
    """The bucket copy of incarnation `keys`: `record.json`, else the record its original
    carries. NotFound when there is neither."""
    try:
        return ImageRecord.from_dict(json.loads(store.read_bytes(keys.record)))
    except NotFound:
        pass
    carried = store.stat(keys.original).metadata.get(META_RECORD)
    if carried is None:
        raise NotFound(f"{keys.prefix}: no copy of the record in the bucket")
    inflated = zlib.decompressobj().decompress(base64.b64decode(carried), _INFLATED_MAX)
    return ImageRecord.from_dict(json.loads(inflated))


def mirror_record(records: Records, store: Store, owner: str, image_id: str, gen: str) -> None:
    """Make the bucket copy of incarnation `gen` of the image what Redis holds now.

    Reads the record, writes it, and reads it again: when another writer changed it in
    between, the copy is written again. When the record is gone, or is another incarnation
    (deleted, or deleted and uploaded again), no copy is written, and one this call wrote is
    deleted again (the deletion's purge would remove it later anyway). StorageUnavailable
    and QueueUnavailable propagate: the copy may then be behind until the record's next
    writer mirrors it.
    """
    keys = ObjectKeys(owner, image_id, gen)
    written: ImageRecord | None = None
    for _ in range(_ROUNDS):
        try:
            current: ImageRecord | None = records.get(owner, image_id)
        except NotFound:
            current = None
        if current is None or current.gen != gen:
            if written is not None:
                store.delete(keys.record)
            return
        if current == written:
            return
        store.put_json(keys.record, current.to_dict())
        written = current
    log.info(
        "%s: the record kept changing while it was mirrored; its last writer mirrors it",
        keys.prefix,
    )

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from core.janitor import abort_stale_uploads, sweep_purges
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store


def test_only_stale_incomplete_uploads_are_aborted(store: Store) -> None:
    # As a web process killed mid-upload leaves it: created, never completed nor aborted.
    store.start_multipart("alice/killed/original", "image/jpeg", {})
    assert len(store.incomplete_uploads()) == 1

    assert abort_stale_uploads(store, timedelta(hours=1)) == 0  # too young: may still finish
    assert len(store.incomplete_uploads()) == 1

    later = datetime.now(UTC) + timedelta(hours=2)
    assert abort_stale_uploads(store, timedelta(hours=1), now=later) == 1
    assert store.incomplete_uploads() == []


def test_pending_purges_are_finished(store: Store, settings: Settings) -> None:
    # As a DELETE leaves it when the store failed after the record was removed.
    store.put_json("alice/gone/record.json", {"id": "gone"})
    store.put("alice/gone/w256.webp", b"RIFF....", "image/webp", {})
    store.put("alice/kept/original", b"x", "image/png", {})
    records = Records(connect(settings))
    records.queue_purge("alice/gone/")
    assert sweep_purges(store, records) == 1
    assert store.keys("") == ["alice/kept/original"]
    assert records.due_purges() == []

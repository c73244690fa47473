"""Failures in the middle of an upload: interrupts and a store that goes away."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import falcon.testing
import pytest
from redis import Redis

from core import janitor
from core.errors import StorageUnavailable
from core.ingest import Ingest, Limits, ReadSource
from core.leases import expired_multipart
from core.records import Records
from core.settings import Settings
from core.sink import ObjectSink
from core.storage import Store
from tests import servers
from tests.faults import Outage
from tests.http import Api
from tests.images import Body, png
from tests.integration.conftest import ALICE_KEY
from tests.keys import keys_of

MiB = 1024 * 1024
AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def interrupted(size: int, after: int, exc: BaseException) -> Callable[[int], bytes]:
    """A read(n) over a generated body that raises `exc` once `after` bytes were read."""
    data = memoryview(Body(size).read_all())
    sent = 0

    def read(n: int) -> bytes:
        nonlocal sent
        if sent >= after:
            raise exc
        chunk = bytes(data[sent : sent + n])
        sent += len(chunk)
        return chunk

    return read


@pytest.mark.parametrize("exc", [SystemExit(1), KeyboardInterrupt(), ConnectionResetError()])
def test_interrupted_multipart_upload_is_aborted(
    store: Store, settings: Settings, exc: BaseException
) -> None:
    # gunicorn's sync-worker timeout raises SystemExit inside the request; the minio SDK's
    # put_object aborts only on Exception, so it leaves the incomplete upload behind (seen
    # end to end on SeaweedFS with minio 7.2.20). Ours must not.
    limits = Limits(5 * MiB, 100 * MiB, 10**8, 2 * MiB, settings.allowed_formats)
    with ThreadPoolExecutor(2) as pool:
        sink = ObjectSink(store, "alice/interrupted/original", pool, {})
        read = interrupted(40 * MiB, 17 * MiB, exc)
        with pytest.raises(type(exc)):
            Ingest(ReadSource(read), limits, sink).run()
    assert store.incomplete_uploads() == []
    assert store.keys("") == []


def test_store_going_away_mid_upload_is_a_503(
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]],
    env: dict[str, str],
    s3_outage: Outage,
    store: Store,
    redis_client: Redis,
) -> None:
    _, api = start_api({**env, "S3_ENDPOINT": s3_outage.endpoint, "PICSTREAM_LEASE_SECONDS": "1"})
    body = Body(30 * MiB)
    started: list[object] = []

    def pieces() -> Iterator[bytes]:
        for piece in body:
            # The store goes away once a multipart upload is under way, well before the body
            # ends: the web process has its id (registered, for the janitor) and the store
            # lists it. Not as soon as the store lists it: a cut then can take the answer
            # to CreateMultipartUpload with it, and an upload whose id the web process never
            # learnt is the stale-upload sweep's, a day later.
            if (
                not started
                and expired_multipart(redis_client, now_ms=2**62)
                and (under_way := store.incomplete_uploads())
            ):
                started.extend(under_way)
                s3_outage.cut()
            yield piece

    resp = api.upload(pieces(), chunked=True)
    assert started, "no multipart upload had started when the store went away"
    assert resp.status == 503
    assert resp.header("Content-Type") == "application/problem+json"
    assert resp.json["type"] == "urn:picstream:problem:storage-unavailable"
    assert "S3" in resp.json["detail"] or "Error" in resp.json["detail"]

    s3_outage.down = False  # the store is back: whatever the web process could not abort,
    records = Records(redis_client)  # the janitor does
    deadline = time.monotonic() + 20
    while store.incomplete_uploads():
        assert time.monotonic() < deadline, "the janitor never aborted the upload"
        janitor.run_once(store, records)
        time.sleep(0.1)
    assert store.keys("") == []
    assert records.page("alice", 10, None)[0] == []  # no image was recorded


def test_translated_errors_name_no_credentials(settings: Settings) -> None:
    dead = Settings.from_env(
        {
            "S3_ENDPOINT": f"http://127.0.0.1:{servers.free_port()}",
            "S3_ACCESS_KEY": "AKIA-VISIBLE",
            "S3_SECRET_KEY": "secret-never-shown",
        }
    )
    with pytest.raises(StorageUnavailable) as info:
        Store.from_settings(dead).ping()
    assert "secret-never-shown" not in info.value.detail
    assert "AKIA-VISIBLE" not in info.value.detail


def test_delete_while_the_store_is_down_is_finished_later(
    client_with: Callable[..., falcon.testing.TestClient],
    s3_outage: Outage,
    store: Store,
    redis_client: Redis,
) -> None:
    client = client_with(S3_ENDPOINT=s3_outage.endpoint)
    created = client.simulate_post("/v1/images", body=png(4, 4), headers=AS_ALICE).json
    image_id = created["id"]
    assert store.keys(keys_of(created).prefix) != []
    s3_outage.cut()
    gone = client.simulate_delete(f"/v1/images/{image_id}", headers=AS_ALICE)
    assert gone.status_code == 202  # gone for clients; the files wait for the janitor
    assert client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE).status_code == 404
    # Due now, for exactly this incarnation's prefix, never the id's.
    records = Records(redis_client)
    due = records.due_purges()
    assert [p.prefix for p in due] == [keys_of(created).prefix]

    s3_outage.down = False  # the store is back and the janitor runs
    janitor.run_once(store, records)
    assert store.keys(keys_of(created).prefix) == []
    assert records.due_purges() == []

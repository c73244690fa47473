"""Failures in the middle of an upload: interrupts and a store that goes away."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from redis import Redis

from core.errors import StorageUnavailable
from core.ingest import Ingest, Limits, ReadSource
from core.records import Records
from core.settings import Settings
from core.sink import ObjectSink
from core.storage import Store
from tests import servers
from tests.http import Api
from tests.images import Body, png
from tests.integration.conftest import make_env
from tests.keys import keys_of

MiB = 1024 * 1024


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
    redis_server: servers.Server,
    workdir: Path,
) -> None:
    doomed = servers.start_seaweedfs(workdir / "s3-doomed")
    try:
        env = make_env(redis_server.extra["url"], doomed.extra["endpoint"])
        Store.from_settings(Settings.from_env(env)).ensure_bucket()
        _, api = start_api(env)
        body = Body(30 * MiB)

        def pieces() -> Iterator[bytes]:
            for n, piece in enumerate(body):
                if n == 12:  # two parts are in the store by now
                    doomed.stop()
                yield piece

        resp = api.upload(pieces(), chunked=True)
        assert resp.status == 503
        assert resp.header("Content-Type") == "application/problem+json"
        assert resp.json["type"] == "urn:picstream:problem:storage-unavailable"
        assert "S3" in resp.json["detail"] or "Error" in resp.json["detail"]
    finally:
        doomed.stop()


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
    start_api: Callable[[dict[str, str]], tuple[servers.Server, Api]],
    redis_server: servers.Server,
    redis_client: Redis,
    workdir: Path,
) -> None:
    doomed = servers.start_seaweedfs(workdir / "s3-doomed-delete")
    try:
        env = make_env(redis_server.extra["url"], doomed.extra["endpoint"])
        Store.from_settings(Settings.from_env(env)).ensure_bucket()
        _, api = start_api(env)
        created = api.upload(png(4, 4)).json
        image_id = created["id"]
        doomed.stop()
        gone = api.request("DELETE", f"/v1/images/{image_id}")
        assert gone.status == 202  # gone for clients; the files wait for the janitor
        assert api.request("GET", f"/v1/images/{image_id}").status == 404
        # Due now, for exactly this incarnation's prefix, never the id's.
        due = Records(redis_client).due_purges()
        assert [p.prefix for p in due] == [keys_of(created).prefix]
    finally:
        doomed.stop()

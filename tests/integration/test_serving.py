"""The read side through a real gunicorn: downloads, ranges, caching, signed links,
negotiation, listing, deletion, owner isolation."""

from __future__ import annotations

import io
import socket
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest
import urllib3
from blake3 import blake3
from PIL import Image
from redis import Redis

from core.signing import sign
from core.storage import Store
from tests import servers
from tests.http import Api, Response
from tests.images import Body
from tests.integration.conftest import ALICE_KEY, BOB_KEY, SIGNING_KEY
from tests.keys import keys_of, variant_key

MiB = 1024 * 1024


def photo(width: int = 640, height: int = 480) -> bytes:
    im = Image.new("RGB", (width, height), (40, 120, 200))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture()
def converted(api: Api, run_jobs: Callable[[], None]) -> dict[str, Any]:
    """An uploaded photo with all its variants made."""
    resp = api.upload(photo(), query="?filename=%C3%A9t%C3%A9%20photo.jpg")
    assert resp.status == 201, resp.body
    run_jobs()
    record: dict[str, Any] = api.request("GET", f"/v1/images/{resp.json['id']}").json
    assert record["status"] == "ready", record
    return record


def assert_download_headers(
    resp: Response, etag: str, content_type: str, pinned: bool = False
) -> None:
    assert resp.header("ETag") == f'"{etag}"'
    assert resp.header("Content-Type") == content_type
    assert resp.header("Accept-Ranges") == "bytes"
    # Links with ?v=<blake3 prefix> (as records give them) are immutable; bare paths may
    # change after a reconvert, so caches revalidate them.
    expected = "private, max-age=31536000, immutable" if pinned else "private, no-cache"
    assert resp.header("Cache-Control") == expected
    assert resp.header("X-Content-Type-Options") == "nosniff"
    assert resp.header(
        "Last-Modified",
    ) and resp.header("Last-Modified").endswith("GMT")


def test_original_download_and_head(api: Api, converted: dict[str, Any], store: Store) -> None:
    url = converted["original_url"].split("127.0.0.1", 1)[1].split("/", 1)[1]
    path = "/" + url
    body = store.read_bytes(keys_of(converted).original)

    got = api.request("GET", path)
    assert got.status == 200
    assert got.body == body
    assert got.header("Content-Length") == str(len(body))
    assert_download_headers(got, converted["blake3"], "image/jpeg", pinned=True)
    assert got.header("Content-Disposition") == (
        "inline; filename=\"ete photo.jpg\"; filename*=UTF-8''%C3%A9t%C3%A9%20photo.jpg"
    )

    head = api.request("HEAD", path)
    assert head.status == 200 and head.body == b""
    assert head.header("Content-Length") == str(len(body))
    assert_download_headers(head, converted["blake3"], "image/jpeg", pinned=True)
    stale = api.request("GET", path.replace("?v=", "?v=0"))
    assert stale.header("Cache-Control") == "private, no-cache"


@pytest.mark.parametrize(
    ("range_header", "status", "expect"),
    [
        ("bytes=0-9", 206, (0, 9)),
        ("bytes=100-", 206, (100, None)),
        ("bytes=-10", 206, (-10, None)),
        ("bytes=5-5", 206, (5, 5)),
        ("bytes=0-1,5-6", 200, None),  # several ranges: the whole body
    ],
)
def test_ranges(
    api: Api,
    converted: dict[str, Any],
    store: Store,
    range_header: str,
    status: int,
    expect: tuple[int, int | None] | None,
) -> None:
    body = store.read_bytes(keys_of(converted).original)
    size = len(body)
    got = api.request(
        "GET", f"/v1/images/{converted['id']}/original", headers={"Range": range_header}
    )
    assert got.status == status
    if expect is None:
        assert got.body == body
        return
    start, end = expect
    start = size + start if start < 0 else start
    end = size - 1 if end is None else end
    assert got.body == body[start : end + 1]
    assert got.header("Content-Range") == f"bytes {start}-{end}/{size}"
    assert got.header("Content-Length") == str(end - start + 1)


def test_unsatisfiable_range_and_not_modified(api: Api, converted: dict[str, Any]) -> None:
    path = f"/v1/images/{converted['id']}/original"
    far = api.request("GET", path, headers={"Range": f"bytes={converted['size']}-"})
    assert far.status == 416
    assert far.header("Content-Range") == f"bytes */{converted['size']}"

    etag = f'"{converted["blake3"]}"'
    cached = api.request("GET", path, headers={"If-None-Match": etag})
    assert cached.status == 304 and cached.body == b""
    assert cached.header("ETag") == etag
    stale = api.request("GET", path, headers={"If-None-Match": '"something-else"'})
    assert stale.status == 200
    # If-Range with an old ETag: the range is ignored and the whole new body sent.
    moved = api.request("GET", path, headers={"Range": "bytes=0-0", "If-Range": '"old"'})
    assert moved.status == 200 and len(moved.body) == converted["size"]


def test_variants_are_served_with_their_own_etag(
    api: Api, converted: dict[str, Any], store: Store
) -> None:
    for variant in converted["variants"]:
        assert variant["url"].endswith(f"/variants/{variant['name']}?v={variant['blake3'][:16]}")
        pinned = api.request("HEAD", variant["url"].split(str(api.port), 1)[1])
        assert "immutable" in (pinned.header("Cache-Control") or "")
        got = api.request("GET", f"/v1/images/{converted['id']}/variants/{variant['name']}")
        assert got.status == 200, variant
        assert got.body == store.read_bytes(variant_key(converted, variant["name"]))
        assert blake3(got.body).hexdigest() == variant["blake3"]
        mime = {"jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}[variant["format"]]
        assert_download_headers(got, variant["blake3"], mime)
        assert variant["name"] in (got.header("Content-Disposition") or "")
    missing = api.request("GET", f"/v1/images/{converted['id']}/variants/w9999.webp")
    assert missing.status == 404
    assert missing.header("Content-Type") == "application/problem+json"


@pytest.mark.parametrize(
    ("accept", "width", "fmt", "expected_width"),
    [
        ("image/avif,image/webp,*/*", 200, "avif", 256),
        ("image/webp,*/*", 200, "webp", 256),
        ("image/avif;q=0,image/webp", 300, "webp", 640),
        ("*/*", 300, "jpeg", 640),
        (None, 5000, "jpeg", 640),  # wider than anything: the widest
    ],
)
def test_best_variant_negotiation(
    api: Api,
    converted: dict[str, Any],
    accept: str | None,
    width: int,
    fmt: str,
    expected_width: int,
) -> None:
    headers = {"Accept": accept} if accept else {}
    got = api.request("GET", f"/v1/images/{converted['id']}/best?width={width}", headers=headers)
    assert got.status == 200
    assert got.header("Vary") == "Accept"
    assert got.header("Content-Type") == f"image/{fmt}"
    chosen = next(v for v in converted["variants"] if f'"{v["blake3"]}"' == got.header("ETag"))
    assert (chosen["format"], chosen["width"]) == (fmt, expected_width)


def test_signed_links(api: Api, converted: dict[str, Any]) -> None:
    record = api.request("GET", f"/v1/images/{converted['id']}?signed=60").json
    anonymous = Api(api.host, api.port, None)
    signed = record["variants"][0]["signed_url"].split(str(api.port), 1)[1]
    ok = anonymous.request("GET", signed)
    assert ok.status == 200 and ok.header("ETag") == f'"{record["variants"][0]["blake3"]}"'
    original = record["original_signed_url"].split(str(api.port), 1)[1]
    assert anonymous.request("HEAD", original).status == 200

    path, _, query = signed.partition("?")
    params = dict(urllib.parse.parse_qsl(query))
    tampered = {**params, "sig": params["sig"][:-1] + ("0" if params["sig"][-1] != "0" else "1")}
    for bad in (
        f"{path}?{urllib.parse.urlencode(tampered)}",
        f"{path}?{urllib.parse.urlencode({**params, 'expires': int(params['expires']) + 60})}",
        f"{path}?{urllib.parse.urlencode({**params, 'owner': 'bob'})}",
        f"/v1/images/{converted['id']}/original?{query}",  # another path
        f"/v1/images/{converted['id']}?{query}",  # the record is not signable
    ):
        denied = anonymous.request("GET", bad)
        assert denied.status == 403, bad
        assert denied.header("Content-Type") == "application/problem+json"
    expired = sign(SIGNING_KEY.encode(), path, "alice", 10, now=time.time() - 3600)
    assert anonymous.request("GET", f"{path}?{expired}").status == 403
    assert anonymous.request("DELETE", f"{path}?{query}").status in (403, 405)


def test_redirect_to_a_presigned_store_url(
    api: Api, converted: dict[str, Any], store: Store
) -> None:
    got = api.request("GET", f"/v1/images/{converted['id']}/original?redirect=1")
    assert got.status == 302
    location = got.header("Location") or ""
    assert "X-Amz-Signature=" in location
    with urllib3.PoolManager() as pool:
        direct = pool.request("GET", location)
    assert direct.status == 200
    assert direct.data == store.read_bytes(keys_of(converted).original)


def test_every_endpoint_is_owner_scoped(api: Api, converted: dict[str, Any]) -> None:
    bob = Api(api.host, api.port, BOB_KEY)
    base = f"/v1/images/{converted['id']}"
    name = converted["variants"][0]["name"]
    for method, path in [
        ("GET", base),
        ("GET", f"{base}/original"),
        ("HEAD", f"{base}/original"),
        ("GET", f"{base}/variants/{name}"),
        ("GET", f"{base}/best?width=10"),
        ("GET", f"{base}/events"),
        ("DELETE", base),
        ("POST", f"{base}/reconvert"),
    ]:
        assert bob.request(method, path).status == 404, (method, path)
    assert bob.request("GET", "/v1/images").json["images"] == []
    assert api.request("GET", base).status == 200  # still there for its owner


def test_delete_removes_everything(
    api: Api, converted: dict[str, Any], store: Store, redis_client: Redis
) -> None:
    prefix = keys_of(converted).prefix
    assert len(store.keys(prefix)) == 2 + len(converted["variants"])
    gone = api.request("DELETE", f"/v1/images/{converted['id']}")
    assert gone.status == 204 and gone.body == b""
    assert api.request("GET", f"/v1/images/{converted['id']}").status == 404
    assert api.request("GET", f"/v1/images/{converted['id']}/original").status == 404
    assert api.request("DELETE", f"/v1/images/{converted['id']}").status == 404
    assert store.keys(prefix) == []
    assert redis_client.zcard("picstream:images:alice") == 0


def test_delete_before_conversion_recreates_nothing(
    api: Api, store: Store, run_jobs: Callable[[], None], redis_client: Redis
) -> None:
    image_id = api.upload(photo()).json["id"]
    assert api.request("DELETE", f"/v1/images/{image_id}").status == 204
    run_jobs()  # the queued conversion finds no record and ends quietly
    assert store.keys(f"alice/{image_id}/") == []
    assert redis_client.exists(f"picstream:image:alice:{image_id}") == 0


def test_listing_is_newest_first_and_stable_while_uploads_arrive(api: Api) -> None:
    ids = [api.upload(photo(32, 32), image_id=f"img-{n}").json["id"] for n in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = api.request("GET", f"/v1/images{query}").json
        seen.extend(image["id"] for image in page["images"])
        # New uploads between pages land before the cursor: never repeated nor skipping.
        api.upload(photo(16, 16))
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert api.request("GET", "/v1/images?cursor=bogus!").status == 400
    assert api.request("GET", "/v1/images?limit=0").status == 400


def test_listing_pages_inside_one_millisecond(api: Api, redis_client: Redis) -> None:
    ids = [api.upload(photo(16, 16), image_id=f"same-{n}").json["id"] for n in range(5)]
    # Force equal creation times: the cursor must still neither repeat nor skip.
    redis_client.zadd("picstream:images:alice", {image_id: 1_700_000_000_000 for image_id in ids})
    seen: list[str] = []
    cursor = None
    while True:
        page = api.request("GET", "/v1/images?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        seen.extend(image["id"] for image in page.json["images"])
        cursor = page.json["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(ids, reverse=True)


@pytest.mark.slow
def test_large_download_streams_in_constant_memory_and_disconnects_release_s3(
    api: Api, gunicorn: servers.Server, s3_server: servers.Server, store: Store
) -> None:
    body = Body(200 * MiB)
    created = api.upload(iter(body), headers={"Content-Length": str(body.size)})
    assert created.status == 201
    path = f"/v1/images/{created.json['id']}/original"
    (pid,) = servers.worker_pids(gunicorn)
    baseline = servers.rss_kib(pid)
    peak = servers.PeakRss(pid)
    with peak, urllib3.PoolManager() as pool:
        conn = pool.request(
            "GET",
            f"http://{api.host}:{api.port}{path}",
            headers={"Authorization": f"Bearer {api.key}"},
            preload_content=False,
        )
        hasher = blake3()
        for chunk in conn.stream(1024 * 1024):
            hasher.update(chunk)
        conn.release_conn()
    assert hasher.hexdigest() == body.blake3
    assert (peak.peak - baseline) < 40 * 1024, f"RSS grew {peak.peak - baseline} KiB"

    # Clients that vanish mid-download must not keep S3 connections open.
    for _ in range(6):
        with socket.create_connection((api.host, api.port), timeout=10) as sock:
            sock.sendall(api.headers_for("GET", path))
            first = sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200")
            sock.recv(1024 * 1024)  # some of the body, then hang up
    deadline = time.monotonic() + 20
    while servers.established(pid, {s3_server.port}) > 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert servers.established(pid, {s3_server.port}) <= 2


def test_portable_relay_without_gunicorn(client: Any, store: Store) -> None:
    # Outside gunicorn (here falcon.testing) downloads use the copying relay with read-ahead.
    body = Body(3 * MiB + 5).read_all()
    auth = {"Authorization": f"Bearer {ALICE_KEY}"}
    created = client.simulate_post("/v1/images", body=body, headers=auth)
    assert created.status_code == 201
    path = f"/v1/images/{created.json['id']}/original"
    whole = client.simulate_get(path, headers=auth)
    assert whole.status_code == 200 and whole.content == body
    part = client.simulate_get(path, headers={**auth, "Range": "bytes=1048570-2097160"})
    assert part.status_code == 206 and part.content == body[1048570:2097161]

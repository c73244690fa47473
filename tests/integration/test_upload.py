"""Uploads through a real gunicorn into a real SeaweedFS, recorded in a real Redis."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable

import pytest
import urllib3
from blake3 import blake3
from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from core.mirror import read_copy
from core.settings import Settings
from core.storage import Store
from tests.http import Api, multipart
from tests.images import Body, jpeg, png
from tests.keys import keys_of
from tests.servers import Server

MiB = 1024 * 1024
PART = 5 * MiB


def assert_nothing_left(store: Store) -> None:
    """What a failed upload must leave behind: no object, no incomplete multipart upload."""
    assert store.incomplete_uploads() == []
    assert store.keys("") == []


def queued_jobs(redis_client: Redis, settings: Settings) -> list[dict[str, str]]:
    queue = Queue(settings.queue, connection=redis_client, serializer=JSONSerializer)
    return [job.kwargs for job in queue.jobs]


def test_raw_upload_is_stored_recorded_and_queued(
    api: Api, store: Store, redis_client: Redis, settings: Settings
) -> None:
    body = jpeg(640, 480, orientation=6, pad=5000)
    resp = api.upload(body, headers={"Content-Type": "image/jpeg"}, query="?filename=cat.jpg")

    assert resp.status == 201, resp.body
    record = resp.json
    assert resp.header("Location") == f"/v1/images/{record['id']}"
    assert record["owner"] == "alice"
    assert record["status"] == "processing"
    assert record["size"] == len(body)
    assert record["blake3"] == blake3(body).hexdigest()
    assert (record["format"], record["content_type"]) == ("jpeg", "image/jpeg")
    # Orientation 6 stores 640x480 and displays 480x640.
    assert (record["width"], record["height"], record["orientation"]) == (480, 640, 6)
    assert record["filename"] == "cat.jpg"
    # The default profile's variants, planned from the header: 480 px wide, so w2048 would
    # only repeat w1024 (made at the original size) and is left out.
    assert record["profile"] == "default"
    assert [(v["name"], v["status"]) for v in record["variants"]] == [
        (f"w{w}.{ext}", "pending") for ext in ("avif", "webp", "jpg") for w in (256, 1024)
    ]
    assert record["created_at"].endswith("Z")

    key = keys_of(record).original
    assert store.read_bytes(key) == body
    info = store.stat(key)
    assert info.content_type == "image/jpeg"
    assert info.metadata["picstream-blake3"] == record["blake3"]
    # The bucket copy of the record (what `picstream-admin rebuild` restores from) exists
    # as soon as the upload is answered; this one travels on the original itself.
    assert read_copy(store, keys_of(record)).to_dict() == {
        k: v for k, v in record.items() if k not in ("url", "original_url")
    }
    assert not store.exists(keys_of(record).record)
    assert queued_jobs(redis_client, settings) == [
        {"owner": "alice", "image_id": record["id"], "gen": record["gen"], "vset": record["vset"]}
    ]
    assert api.request("GET", f"/v1/images/{record['id']}").json == record


@pytest.mark.parametrize(
    ("query", "carried"),
    [
        ("?alt=a%20cat", True),
        ("?metadata=%7B%22album%22%3A%22private%22%7D", False),
        ("?callback=http%3A%2F%2F127.0.0.1%3A9%2Fhook", False),
    ],
)
def test_the_record_travels_on_the_original_only_without_private_fields(
    api: Api,
    store: Store,
    env: dict[str, str],
    start_api: Callable[[dict[str, str]], tuple[Server, Api]],
    query: str,
    carried: bool,
) -> None:
    """Whoever may fetch an original (a presigned `?redirect=1` link goes straight to the
    store) sees its object metadata: a record with metadata or a webhook URL never travels
    there; its bucket copy is record.json, written before the answer."""
    if "callback" in query:
        _, api = start_api({**env, "PICSTREAM_WEBHOOK_HOSTS": "127.0.0.1:9"})
    resp = api.upload(jpeg(64, 48), query=query)
    assert resp.status == 201, resp.body
    keys = keys_of(resp.json)
    assert read_copy(store, keys).to_dict() == {
        k: v for k, v in resp.json.items() if k not in ("url", "original_url")
    }
    assert store.exists(keys.record) is not carried
    redirect = api.request("GET", f"/v1/images/{resp.json['id']}/original?redirect=1")
    with urllib3.PoolManager() as pool:
        direct = pool.request("GET", redirect.header("Location") or "")
    assert direct.status == 200
    seen = {k.lower(): v for k, v in direct.headers.items()}
    assert ("x-amz-meta-picstream-record" in seen) is carried
    assert "private" not in str(seen) and "hook" not in str(seen)


def test_multipart_upload_takes_the_filename_from_the_file_field(api: Api, store: Store) -> None:
    image = png(7, 5)
    pieces, content_type = multipart(image, filename="holiday photo.png", content_type="image/png")
    resp = api.request("POST", "/v1/images", pieces, {"Content-Type": content_type})

    assert resp.status == 201, resp.body
    assert resp.json["filename"] == "holiday photo.png"
    assert (resp.json["width"], resp.json["height"], resp.json["format"]) == (7, 5, "png")
    assert store.read_bytes(keys_of(resp.json).original) == image


@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_chunked_bodies_are_read_in_full(api: Api, store: Store, kind: str) -> None:
    body = Body(12 * MiB + 17, piece=300 * 1024)
    headers = {"Content-Type": "image/png"}
    pieces = iter(body)
    if kind == "multipart":
        pieces_list, headers["Content-Type"] = multipart(body, filename="big.png")
        pieces = iter(pieces_list)
    resp = api.request("POST", "/v1/images", pieces, headers, chunked=True)

    assert resp.status == 201, resp.body
    assert resp.json["size"] == body.size
    assert resp.json["blake3"] == body.blake3
    assert (
        blake3(store.read_bytes(keys_of(resp.json).original)).hexdigest() == body.blake3
    )
    assert store.incomplete_uploads() == []


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_many_parts_long(api: Api, store: Store, chunked: bool) -> None:
    body = Body(100 * MiB + 123)
    headers = {} if chunked else {"Content-Length": str(body.size)}
    resp = api.upload(iter(body), chunked=chunked, headers=headers)

    assert resp.status == 201, resp.body
    assert (resp.json["size"], resp.json["blake3"]) == (body.size, body.blake3)
    key = keys_of(resp.json).original
    assert store.stat(key).size == body.size
    hasher = blake3()
    hasher.update(store.read_bytes(key))
    assert hasher.hexdigest() == body.blake3
    assert store.stat(key).metadata["picstream-blake3"] == body.blake3


@pytest.mark.parametrize("size", [PART - 1, PART, PART + 1, 2 * PART, 2 * PART + 1])
def test_bodies_at_part_boundaries(api: Api, store: Store, size: int) -> None:
    body = Body(size, piece=PART // 2)
    resp = api.upload(iter(body), chunked=True)

    assert resp.status == 201, resp.body
    data = store.read_bytes(keys_of(resp.json).original)
    assert len(data) == size
    assert blake3(data).hexdigest() == body.blake3
    assert store.incomplete_uploads() == []


def test_header_arriving_one_byte_at_a_time(api: Api, store: Store) -> None:
    body = jpeg(1024, 768, orientation=8, pad=3000)
    pieces = [body[i : i + 1] for i in range(len(body))]
    resp = api.upload(iter(pieces), chunked=True)

    assert resp.status == 201, resp.body
    assert (resp.json["width"], resp.json["height"], resp.json["orientation"]) == (768, 1024, 8)
    assert store.read_bytes(keys_of(resp.json).original) == body


def test_dimensions_behind_a_large_icc_profile(api: Api) -> None:
    body = jpeg(4000, 3000, orientation=1, pad=400_000)
    resp = api.upload(body)
    assert resp.status == 201, resp.body
    assert (resp.json["width"], resp.json["height"]) == (4000, 3000)


def test_repr_digest_is_verified(api: Api, store: Store) -> None:
    body = png(10, 10)
    good = base64.b64encode(hashlib.sha256(body).digest()).decode()
    bad = base64.b64encode(hashlib.sha256(body + b"x").digest()).decode()

    resp = api.upload(body, headers={"Repr-Digest": f"sha-256=:{bad}:"})
    assert resp.status == 422
    assert resp.header("Content-Type") == "application/problem+json"
    assert resp.json["type"].endswith("digest-mismatch")
    assert_nothing_left(store)

    assert api.upload(body, headers={"Repr-Digest": f"sha-256=:{good}:"}).status == 201


def test_digest_mismatch_on_a_multipart_upload_aborts_it(api: Api, store: Store) -> None:
    body = Body(11 * MiB)
    bad = base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    resp = api.upload(iter(body), chunked=True, headers={"Repr-Digest": f"sha-256=:{bad}:"})
    assert resp.status == 422
    assert_nothing_left(store)


def test_unknown_digest_algorithm_is_refused(api: Api, store: Store) -> None:
    resp = api.upload(png(), headers={"Repr-Digest": "md5=:AAAA:"})
    assert resp.status == 400
    assert "sha-256" in resp.json["detail"]
    assert_nothing_left(store)


def test_keep_alive_and_pipelined_requests_after_an_upload(api: Api, store: Store) -> None:
    # The body is read straight from the socket: bytes after it belong to the next request.
    image = png(12, 9)
    upload = api.headers_for(
        "POST", "/v1/images", f"Content-Length: {len(image)}\r\nContent-Type: image/png\r\n"
    )
    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    sock, first = api.raw(upload + image + health)
    try:
        assert first.startswith(b"HTTP/1.1 201"), first[:300]
        head, _, received = first.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        record = json.loads(received[:length])
        rest = received[length:]  # the second answer may have come in the same read
        while b'{"status": "ok"}' not in rest:
            chunk = sock.recv(65536)
            assert chunk, rest
            rest += chunk
        assert rest.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    assert store.read_bytes(keys_of(record).original) == image

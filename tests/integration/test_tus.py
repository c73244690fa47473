"""Resumable uploads (tus 1.0) through real gunicorns into SeaweedFS, state in Redis.

What a tus client sees (statuses, Upload-Offset, Picstream-Image) and what is left in the
bucket and in Redis after every ending: complete, cut, killed, expired, terminated, refused.
Parts are 5 MiB here (conftest), so PATCHes of 1 byte, 5 MiB - 1, 5 MiB + 1 and several
parts cross every boundary the writer has (tail object, part, last part).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import falcon.testing
import pytest
from blake3 import blake3
from minio.datatypes import Part
from redis import Redis

from api.app import Collaborators
from api.app import _routes as app_routes
from api.tus import Resumable, TusCreation
from core import janitor
from core.ingest import PartBuffer
from core.leases import MULTIPART_KEY
from core.mirror import read_copy
from core.records import PURGES_KEY, Records, lease_key
from core.settings import S3_MAX_PARTS
from core.storage import MultipartUpload, Store
from core.tus import POOL, PatchWriter, TusStates
from tests import servers
from tests.http import Api, Response
from tests.images import jpeg, png
from tests.integration.conftest import ALICE_KEY, BOB_KEY
from tests.keys import keys_of
from tests.lifecycle import wait_until

MiB = 1024 * 1024
PART = 5 * MiB
TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}
StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]


def image(size: int) -> bytes:
    """A JPEG header (what the sniffer decides on) and `size` bytes in all."""
    head = jpeg(640, 480, pad=300)
    return head + os.urandom(size - len(head))


def mint(api: Api, **asked: Any) -> dict[str, Any]:
    as_json = {"Content-Type": "application/json"}
    made = api.request("POST", "/v1/upload-tokens", json.dumps(asked).encode(), as_json)
    assert made.status == 201, made.body
    return dict(made.json)


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def create(api: Api, length: int | None, key: str | None = "default", **meta: str) -> Response:
    size = {"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"}
    headers = {**TUS, **size, "Upload-Metadata": metadata(**meta)}
    return api.request("POST", "/v1/tus", headers=headers, key=key)


def patch(api: Api, location: str, offset: int, data: bytes, **headers: str) -> Response:
    hdrs = {**OCTETS, "Upload-Offset": str(offset), **headers}
    return api.request("PATCH", location, data, hdrs)


def head(api: Api, location: str, key: str | None = "default") -> Response:
    return api.request("HEAD", location, headers=TUS, key=key)


def send(api: Api, body: bytes, sizes: list[int], **meta: str) -> tuple[str, Response]:
    """Create an upload of `body` and PATCH it in pieces of `sizes` (the last piece takes the
    rest); returns the upload's location and the last answer."""
    made = create(api, len(body), **meta)
    assert made.status == 201, made.body
    location = made.header("Location")
    assert location is not None and location.startswith("/v1/tus/")
    offset = 0
    answer = made
    for size in [*sizes, len(body)]:
        piece = body[offset : offset + size]
        if not piece:
            break
        answer = patch(api, location, offset, piece)
        assert answer.status == 204, answer.body
        offset += len(piece)
        assert answer.header("Upload-Offset") == str(offset)
    return location, answer


def record_of(api: Api, answer: Response) -> dict[str, Any]:
    path = answer.header("Picstream-Image")
    assert path is not None, answer.headers
    got = api.request("GET", path)
    assert got.status == 200
    return dict(got.json)


def only_the_image_is_left(store: Store, record: dict[str, Any]) -> None:
    assert store.incomplete_uploads() == []
    prefix = f"{record['owner']}/{record['id']}/"
    # The original and the bucket copy of its record (record.json, or on the original).
    assert sorted(k.rsplit("/", 1)[1] for k in store.keys(prefix)) in (
        ["original", "record.json"],
        ["original"],
    )
    assert read_copy(store, keys_of(record)).blake3 == record["blake3"]
    assert sorted(store.keys("")) == sorted(store.keys(prefix))


def nothing_is_left(store: Store, redis_client: Redis) -> None:
    assert store.incomplete_uploads() == []
    assert store.keys("") == []
    assert redis_client.zcard(MULTIPART_KEY) == 0
    assert redis_client.zcard(PURGES_KEY) == 0


# ------------------------------------------------------------------ discovery and creation


def test_options_advertises_the_protocol_and_the_upload_limit(api: Api) -> None:
    got = api.request("OPTIONS", "/v1/tus")
    assert got.status == 204
    assert got.header("Tus-Version") == "1.0.0"
    assert got.header("Tus-Max-Size") == str(300 * MiB)  # PICSTREAM_MAX_UPLOAD_BYTES
    extensions = set((got.header("Tus-Extension") or "").split(","))
    assert extensions == {
        "creation",
        "creation-with-upload",
        "creation-defer-length",
        "termination",
        "expiration",
        "checksum",
    }
    assert "sha1" in (got.header("Tus-Checksum-Algorithm") or "")
    assert api.request("OPTIONS", "/v1/tus", key=None).status == 401


@pytest.mark.parametrize(
    "sizes",
    [
        pytest.param([1, 1, 1, 7, 300], id="1-byte-patches"),
        pytest.param([PART - 1, 1, PART + 1], id="around-the-part-size"),
        pytest.param([3 * PART + 12345], id="several-parts-in-one-patch"),
        pytest.param([123, PART - 1, 2 * PART + 7, 11], id="unaligned-offsets"),
    ],
)
def test_an_upload_in_pieces_becomes_an_image_with_its_exact_blake3(
    api: Api, store: Store, redis_client: Redis, sizes: list[int]
) -> None:
    body = image(4 * PART + 999)
    location, last = send(api, body, sizes, filename="holiday.jpg")

    record = record_of(api, last)
    assert (record["size"], record["blake3"]) == (len(body), blake3(body).hexdigest())
    assert (record["format"], record["width"], record["height"]) == ("jpeg", 640, 480)
    assert record["filename"] == "holiday.jpg" and record["status"] == "processing"
    assert api.request("GET", f"/v1/images/{record['id']}/original").body == body
    only_the_image_is_left(store, record)
    assert redis_client.zcard(MULTIPART_KEY) == 0
    assert redis_client.zcard(PURGES_KEY) == 0  # the guard went with the commit
    # The conversion job is queued as for a plain upload.
    assert redis_client.llen("rq:queue:convert") == 1
    later = head(api, location)
    assert later.status == 200
    assert later.header("Upload-Offset") == later.header("Upload-Length") == str(len(body))
    assert later.header("Picstream-Image") == f"/v1/images/{record['id']}"
    assert later.header("Cache-Control") == "no-store"


def test_a_small_image_in_one_creation_request(api: Api, store: Store) -> None:
    body = png(40, 30)
    headers = {**OCTETS, "Upload-Length": str(len(body)), "Upload-Metadata": metadata(id="tiny")}
    made = api.request("POST", "/v1/tus", body, headers)
    assert made.status == 201, made.body
    assert made.header("Upload-Offset") == str(len(body))
    assert made.header("Picstream-Image") == "/v1/images/tiny"
    record = record_of(api, made)
    assert (record["format"], record["blake3"]) == ("png", blake3(body).hexdigest())
    only_the_image_is_left(store, record)


def test_creation_with_upload_of_part_of_the_file_then_patches(api: Api) -> None:
    body = image(PART + 100)
    headers = {**OCTETS, "Upload-Length": str(len(body))}
    made = api.request("POST", "/v1/tus", body[:1000], headers)
    assert made.status == 201 and made.header("Upload-Offset") == "1000"
    assert made.header("Upload-Expires", ) is not None
    last = patch(api, made.header("Location") or "", 1000, body[1000:])
    assert last.status == 204
    assert record_of(api, last)["blake3"] == blake3(body).hexdigest()


def test_a_deferred_length_is_given_by_a_later_patch(api: Api) -> None:
    body = image(PART + 5)
    made = create(api, None)
    location = made.header("Location") or ""
    assert head(api, location).header("Upload-Defer-Length") == "1"
    assert patch(api, location, 0, body[:PART + 1]).status == 204
    last = patch(api, location, PART + 1, body[PART + 1 :], **{"Upload-Length": str(len(body))})
    assert last.status == 204, last.body
    assert record_of(api, last)["size"] == len(body)
    refused = patch(api, location, len(body), b"", **{"Upload-Length": str(len(body) + 1)})
    assert refused.status in (204, 409)  # complete: never a second length


def test_metadata_chooses_the_id_and_profile(api: Api, tmp_path: Any) -> None:
    body = image(1000)
    _, last = send(api, body, [], id="chosen-id", profile="default")
    assert last.header("Picstream-Image") == "/v1/images/chosen-id"
    assert create(api, 1000, profile="no-such-profile").status == 400
    assert create(api, 1000, id="bad id!").status == 400
    assert create(api, 1000, callback="http://not-allowed.example/hook").status == 400


def test_a_client_chosen_id_is_idempotent_like_put(
    api: Api, store: Store, redis_client: Redis
) -> None:
    body = image(PART + 10)
    _, first = send(api, body, [PART], id="same")
    record = record_of(api, first)
    # The same bytes again: the existing image, and no second copy in the bucket.
    _, again = send(api, body, [7], id="same")
    assert again.header("Picstream-Image") == "/v1/images/same"
    assert record_of(api, again)["gen"] == record["gen"]
    only_the_image_is_left(store, record)
    # Another size: refused at creation. Same size, other bytes: refused at the end.
    assert create(api, len(body) + 1, id="same").status == 409
    other = image(len(body))
    made = create(api, len(other), id="same")
    assert made.status == 201
    answer = patch(api, made.header("Location") or "", 0, other)
    assert answer.status == 409, answer.body
    only_the_image_is_left(store, record)
    assert redis_client.zcard(PURGES_KEY) == 0
    assert head(api, made.header("Location") or "").status == 404


# ------------------------------------------------------------------ protocol errors


def test_protocol_errors_are_problems_and_change_nothing(api: Api) -> None:
    body = image(PART + 10)
    location = create(api, len(body)).header("Location") or ""
    assert patch(api, location, 0, body[:100]).status == 204

    wrong_offset = patch(api, location, 50, body[50:200])
    assert wrong_offset.status == 409
    assert wrong_offset.header("Content-Type") == "application/problem+json"
    no_version = api.request("PATCH", location, b"x", {**OCTETS, "Tus-Resumable": "0.2.2"})
    assert no_version.status == 412 and no_version.header("Tus-Version") == "1.0.0"
    wrong_type = api.request(
        "PATCH", location, b"x", {**TUS, "Upload-Offset": "100", "Content-Type": "image/jpeg"}
    )
    assert wrong_type.status == 415
    past_the_end = patch(api, location, 100, body[100:] + b"extra")
    assert past_the_end.status == 413
    assert head(api, location).header("Upload-Offset") == "100"
    assert create(api, 301 * MiB).status == 413  # above PICSTREAM_MAX_UPLOAD_BYTES
    assert create(api, 0).status == 400
    both = api.request(
        "POST", "/v1/tus", headers={**TUS, "Upload-Length": "5", "Upload-Defer-Length": "1"}
    )
    assert both.status == 400
    assert api.request("HEAD", "/v1/tus/" + "A" * 22, headers=TUS).status == 404
    assert api.request("HEAD", "/v1/tus/../../etc", headers=TUS).status == 404


def test_another_owner_cannot_see_or_touch_an_upload(api: Api) -> None:
    body = image(1000)
    location = create(api, len(body)).header("Location") or ""
    bob = Api(api.host, api.port, BOB_KEY)
    assert head(bob, location).status == 404
    assert patch(bob, location, 0, body).status == 404
    assert bob.request("DELETE", location, headers=TUS).status == 404
    assert head(api, location).header("Upload-Offset") == "0"


def test_a_non_image_is_refused_by_the_patch_carrying_its_head(
    api: Api, store: Store, redis_client: Redis
) -> None:
    location = create(api, 20 * MiB).header("Location") or ""
    refused = patch(api, location, 0, b"%PDF-1.7\n" + b"\x00" * 4000)
    assert refused.status == 415, refused.body
    assert head(api, location).status == 404  # the upload is ended
    nothing_is_left(store, redis_client)


def test_an_upload_that_used_up_the_part_numbers_is_ended_with_a_clear_answer(
    api: Api, store: Store, redis_client: Redis, services: Collaborators
) -> None:
    """Part numbers are never reused (a stalled PATCH may still be writing its part), so
    thousands of cut or refused PATCHes can use up S3's 10,000: the next part is then a
    410 that says so, never a store error, and the upload is ended with nothing left."""
    body = image(2 * PART + 10)
    location = create(api, len(body)).header("Location") or ""
    assert patch(api, location, 0, body[:PART]).status == 204  # part 1: a multipart upload
    states = TusStates(services.records.redis, services.leases)
    state = states.load(location.rsplit("/", 1)[1])
    assert state is not None
    while states.next_part(state) < S3_MAX_PARTS:  # as abandoned PATCHes would have
        pass
    refused = patch(api, location, PART, body[PART : 2 * PART])
    assert refused.status == 410, refused.body
    assert refused.json["type"] == "urn:picstream:problem:upload-exhausted"
    assert "start a new upload" in refused.json["detail"]
    assert head(api, location).status == 404  # the upload is ended
    nothing_is_left(store, redis_client)


def test_a_head_sent_byte_by_byte_is_refused_once_it_is_decided(
    api: Api, store: Store, redis_client: Redis
) -> None:
    location = create(api, 1000).header("Location") or ""
    garbage = b"NOT AN IMAGE AT ALL, JUST TEXT"
    statuses = []
    for offset, byte in enumerate(garbage):
        answer = patch(api, location, offset, bytes([byte]))
        statuses.append(answer.status)
        if answer.status != 204:
            break
    assert statuses[-1] == 415 and set(statuses[:-1]) <= {204}
    nothing_is_left(store, redis_client)


# ------------------------------------------------------------------ checksums


def test_a_patch_with_a_wrong_checksum_keeps_nothing_of_it(api: Api) -> None:
    body = image(2 * PART + 300)
    location = create(api, len(body)).header("Location") or ""
    piece = body[: PART + 200]  # crosses a part: the part it sent is not kept either

    def checksum(data: bytes) -> str:
        digest = hashlib.sha1(data, usedforsecurity=False).digest()
        return "sha1 " + base64.b64encode(digest).decode()

    wrong = patch(api, location, 0, piece, **{"Upload-Checksum": checksum(b"other")})
    assert wrong.status == 460
    assert head(api, location).header("Upload-Offset") == "0"
    right = patch(api, location, 0, piece, **{"Upload-Checksum": checksum(piece)})
    assert right.status == 204 and right.header("Upload-Offset") == str(len(piece))
    bad = patch(api, location, len(piece), body[len(piece) :], **{"Upload-Checksum": "crc9 AA=="})
    assert bad.status == 400
    last = patch(
        api,
        location,
        len(piece),
        body[len(piece) :],
        **{"Upload-Checksum": checksum(body[len(piece) :])},
    )
    assert last.status == 204
    assert record_of(api, last)["blake3"] == blake3(body).hexdigest()


# ------------------------------------------------------------------ cuts, kills, races


def cut_after(api: Api, location: str, offset: int, declared: bytes, sent: int) -> None:
    """A PATCH that declares `declared` but whose connection is closed after `sent` bytes."""
    headers = (
        f"Content-Length: {len(declared)}\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
    )
    sock = socket.create_connection((api.host, api.port))
    sock.sendall(api.headers_for("PATCH", location, headers) + declared[:sent])
    sock.shutdown(socket.SHUT_WR)  # the client is gone: the server reads the end
    sock.recv(65536)  # its answer (or the close), once it has saved what arrived
    sock.close()


def test_a_patch_cut_midway_keeps_what_arrived_and_resumes(
    api: Api, store: Store, redis_client: Redis
) -> None:
    body = image(3 * PART + 77)
    location = create(api, len(body)).header("Location") or ""
    sent = PART + PART // 2  # one part stored, half a part as the tail
    cut_after(api, location, 0, body, sent)

    resumed_at = int(head(api, location).header("Upload-Offset") or "-1")
    assert resumed_at == sent
    last = patch(api, location, resumed_at, body[resumed_at:])
    assert last.status == 204
    record = record_of(api, last)
    assert record["blake3"] == blake3(body).hexdigest()
    only_the_image_is_left(store, record)  # the tail object is gone


def test_two_patches_at_once_one_writes_the_other_is_told_to_wait(
    start_api: StartApi, env: dict[str, str], redis_client: Redis
) -> None:
    # The first PATCH stalls mid-body for longer than the second waits for it (3 s), and
    # shorter than the read timeout that would end it.
    _, api = start_api({**env, "PICSTREAM_READ_TIMEOUT": "60"})
    body = image(2 * PART)
    location = create(api, len(body)).header("Location") or ""
    uid = location.rsplit("/", 1)[1]
    headers = (
        f"Content-Length: {PART}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
        "Content-Type: application/offset+octet-stream\r\n"
    )
    first = socket.create_connection((api.host, api.port))
    first.sendall(api.headers_for("PATCH", location, headers) + body[:1000])
    wait_until(
        lambda: bool(redis_client.exists(lease_key("alice", f"tus-{uid}"))),
        10,
        "the first PATCH to hold the upload",
    )
    second = patch(api, location, 0, body[:PART])
    assert second.status == 423, second.body
    first.sendall(body[1000:PART])
    answer = first.recv(65536)
    first.close()
    assert answer.startswith(b"HTTP/1.1 204")
    assert head(api, location).header("Upload-Offset") == str(PART)


def test_a_web_process_killed_mid_patch_and_the_upload_resumed_through_another(
    start_api: StartApi, env: dict[str, str], store: Store, redis_client: Redis
) -> None:
    # Holds expire 1 s after their process dies; the killed PATCH never times out by itself.
    quick = {**env, "PICSTREAM_LEASE_SECONDS": "1", "PICSTREAM_READ_TIMEOUT": "60"}
    doomed, first = start_api(quick)
    _, other = start_api(quick)
    body = image(4 * PART + 4321)
    location = create(first, len(body)).header("Location") or ""
    headers = (
        f"Content-Length: {len(body)}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
        "Content-Type: application/offset+octet-stream\r\n"
    )
    sock = socket.create_connection((first.host, first.port))
    sock.sendall(first.headers_for("PATCH", location, headers) + body[: 3 * PART - 10])
    try:
        wait_until(
            lambda: int(head(other, location).header("Upload-Offset") or 0) >= 2 * PART,
            20,
            "two parts to be saved",
        )
        os.killpg(doomed.proc.pid, signal.SIGKILL)
        doomed.proc.wait()
    finally:
        sock.close()

    offset = int(head(other, location).header("Upload-Offset") or -1)
    assert offset == 2 * PART  # what was saved before the kill, and nothing half-written

    def resumed() -> bool:  # 423 until the dead process's hold expires (1 s)
        answer = patch(other, location, offset, body[offset:])
        assert answer.status in (204, 423), answer.body
        resumed.answer = answer  # type: ignore[attr-defined]
        return answer.status == 204

    wait_until(resumed, 15, "the upload to resume through the other process")
    record = record_of(other, resumed.answer)  # type: ignore[attr-defined]
    # The hash could not follow the upload to the other process: it re-read the object.
    assert record["blake3"] == blake3(body).hexdigest()
    only_the_image_is_left(store, record)
    janitor.run_once(store, Records(redis_client), now=time.time() + 7 * 86_400)
    only_the_image_is_left(store, record)


# ------------------------------------------------------------------ ending an upload


def test_termination_removes_everything_the_upload_wrote(
    api: Api, store: Store, redis_client: Redis
) -> None:
    body = image(3 * PART)
    location = create(api, len(body)).header("Location") or ""
    assert patch(api, location, 0, body[: PART + 100]).status == 204  # a part and a tail
    assert store.incomplete_uploads() != [] and store.keys("") != []

    assert api.request("DELETE", location, headers=TUS).status == 204
    assert head(api, location).status == 404
    assert patch(api, location, PART + 100, body[PART + 100 :]).status == 404
    nothing_is_left(store, redis_client)


def test_terminating_a_finished_upload_keeps_its_image(api: Api, store: Store) -> None:
    location, last = send(api, image(2000), [])
    record = record_of(api, last)
    assert api.request("DELETE", location, headers=TUS).status == 204
    assert api.request("GET", f"/v1/images/{record['id']}").status == 200
    only_the_image_is_left(store, record)


def test_an_expired_upload_is_gone_and_the_janitor_cleans_it(
    start_api: StartApi, env: dict[str, str], store: Store, redis_client: Redis
) -> None:
    _, api = start_api({**env, "PICSTREAM_TUS_EXPIRY": "1"})
    body = image(3 * PART)
    location = create(api, len(body)).header("Location") or ""
    answer = patch(api, location, 0, body[: PART + 100])
    if answer.status == 204:  # it may already have expired on a slow machine
        assert store.incomplete_uploads() != []
    wait_until(lambda: head(api, location).status == 410, 10, "the upload to expire")
    assert patch(api, location, PART + 100, body[PART + 100 :]).status == 410

    # The janitor's next sweep after the expiry (+ the guard's margin).
    janitor.run_once(store, Records(redis_client), now=time.time() + 120)
    nothing_is_left(store, redis_client)
    assert api.request("DELETE", location, headers=TUS).status == 204
    assert head(api, location).status == 404


def test_a_killed_upload_never_finished_is_left_to_expire_and_be_cleaned(
    api: Api, store: Store, redis_client: Redis
) -> None:
    body = image(3 * PART)
    location = create(api, len(body)).header("Location") or ""
    assert patch(api, location, 0, body[: PART + 100]).status == 204
    # Nothing happens before the expiry (12 h here): the client may come back.
    janitor.run_once(store, Records(redis_client), now=time.time() + 3600)
    assert head(api, location).header("Upload-Offset") == str(PART + 100)
    janitor.run_once(store, Records(redis_client), now=time.time() + 13 * 3600)
    nothing_is_left(store, redis_client)


def test_patches_from_many_threads_to_many_uploads(api: Api, store: Store) -> None:
    bodies = [image(PART + 1000 * n + 1) for n in range(4)]
    results: list[dict[str, Any]] = []

    def run(body: bytes) -> None:
        _, last = send(api, body, [PART // 2, PART // 2])
        results.append(record_of(api, last))

    threads = [threading.Thread(target=run, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r["blake3"] for r in results) == sorted(blake3(b).hexdigest() for b in bodies)
    assert store.incomplete_uploads() == []


def test_through_nginx_a_cut_upload_resumes_and_nothing_is_spooled(
    nginx: servers.Front, store: Store
) -> None:
    front = Api("127.0.0.1", nginx.port, ALICE_KEY)
    body = image(3 * PART + 5)
    location = create(front, len(body)).header("Location") or ""
    cut_after(front, location, 0, body, 2 * PART + 100)

    def saved() -> bool:  # nginx tells the app of the cut when it notices it
        return int(head(front, location).header("Upload-Offset") or 0) > 0

    wait_until(saved, 20, "the cut PATCH to be saved")
    offset = int(head(front, location).header("Upload-Offset") or -1)
    assert 0 < offset <= 2 * PART + 100
    last = patch(front, location, offset, body[offset:])
    assert last.status == 204, last.body
    record = record_of(front, last)
    assert record["blake3"] == blake3(body).hexdigest()
    only_the_image_is_left(store, record)
    assert nginx.temp_files() == []


# ------------------------------------------------------------------ with an upload token


def test_an_upload_token_creates_and_continues_within_its_limits(
    api: Api, store: Store, redis_client: Redis
) -> None:
    token = mint(api, uploads=1, max_bytes=2 * PART, formats=["jpeg"], id="by-token")
    as_page = Api(api.host, api.port, token["token"])
    assert create(as_page, 2 * PART + 1).status == 413  # the token's max_bytes, at once
    assert create(as_page, 1000, id="another-id").status == 403  # the token fixes the id
    body = image(PART + 3)
    location, last = send(as_page, body, [PART // 2])
    assert last.header("Picstream-Image") == "/v1/images/by-token"
    assert record_of(api, last)["blake3"] == blake3(body).hexdigest()
    assert head(as_page, location).status == 200
    assert create(as_page, 1000).status == 401  # its one upload is used
    assert as_page.request("GET", "/v1/images/by-token").status == 403


def test_a_token_format_limit_refuses_the_head_and_a_revoked_token_stops_the_upload(
    api: Api, store: Store, redis_client: Redis
) -> None:
    only_png = mint(api, uploads=2, formats=["png"])
    as_page = Api(api.host, api.port, only_png["token"])
    location = create(as_page, 3 * PART).header("Location") or ""
    assert patch(as_page, location, 0, image(3 * PART)[:PART]).status == 415
    nothing_is_left(store, redis_client)

    body = png(64, 64) + os.urandom(2 * PART)
    location = create(as_page, len(body)).header("Location") or ""
    assert patch(as_page, location, 0, body[: PART + 9]).status == 204
    revoked = api.request("DELETE", f"/v1/upload-tokens/{only_png['jti']}")
    assert revoked.status == 204
    stopped = patch(as_page, location, PART + 9, body[PART + 9 :])
    assert stopped.status == 401 and "revoked" in stopped.json["type"]
    # The owner, with the key, may still finish (or end) it.
    assert patch(api, location, PART + 9, body[PART + 9 :]).status == 204


def test_a_patch_frees_its_part_buffers_without_the_cycle_collector(
    client: falcon.testing.TestClient,
) -> None:
    """Part buffers (a part each) go back to the pool or are freed by reference counting:
    a reference cycle through a part's future kept one alive per part until the cycle
    collector ran (RSS grew by ~20 parts over a 1 GiB upload)."""
    auth = {"Authorization": f"Bearer {ALICE_KEY}", **TUS}
    body = image(4 * PART + 10)
    made = client.simulate_post("/v1/tus", headers={**auth, "Upload-Length": str(len(body))})
    location = made.headers["location"]
    gc.collect()
    gc.disable()
    before = {id(o) for o in gc.get_objects() if isinstance(o, PartBuffer)}
    try:
        for offset in (0, 2 * PART + 5):
            piece = body[offset : offset + 2 * PART + 5]
            headers = {**auth, **OCTETS, "Upload-Offset": str(offset)}
            answer = client.simulate_patch(location, body=piece, headers=headers)
            assert answer.status_code == 204, answer.text
        pooled = {id(b) for b in POOL._free}
        kept = [
            o
            for o in gc.get_objects()
            if isinstance(o, PartBuffer) and id(o) not in before and id(o) not in pooled
        ]
        assert kept == []  # every buffer the PATCHes took is back in the pool, or freed
        writers = [o for o in gc.get_objects() if isinstance(o, PatchWriter)]
        assert writers == []  # nor the writers, which hold their parts' futures
    finally:
        gc.enable()


# ------------------------------------------------------------------ found by review


def resumable_of(services: Collaborators) -> Resumable:
    creation = next(r for path, r in app_routes(services) if path == "/v1/tus")
    assert isinstance(creation, TusCreation)
    return creation.resumable


def test_a_patch_that_waited_while_the_last_one_committed_leaves_the_image_whole(
    api: Api, services: Collaborators, store: Store
) -> None:
    """A request that loaded the upload before the final PATCH committed it, then got the
    lock: it must see the upload done, never treat the image as a copy of itself."""
    body = image(PART + 1000)
    location = create(api, len(body), id="victim").header("Location") or ""
    states = TusStates(services.records.redis, services.leases)
    stale = states.load(location.rsplit("/", 1)[1])
    assert stale is not None and not stale.done
    last = patch(api, location, 0, body)  # the final PATCH commits the image
    assert last.header("Picstream-Image") == "/v1/images/victim"

    again = resumable_of(services).append(stale, len(body), None, None, None)

    assert again.done
    record = record_of(api, last)
    assert api.request("GET", f"/v1/images/{record['id']}/original").body == body
    only_the_image_is_left(store, record)


def test_a_creation_body_longer_than_its_length_is_refused_before_anything_exists(
    api: Api, store: Store, redis_client: Redis
) -> None:
    body = image(PART + 100)
    headers = {**OCTETS, "Upload-Length": str(PART + 10)}
    refused = api.request("POST", "/v1/tus", body, headers)
    assert refused.status == 413 and refused.header("Location") is None
    nothing_is_left(store, redis_client)
    assert list(redis_client.scan_iter("picstream:tus:*")) == []


def test_a_token_reaches_only_the_uploads_it_created(api: Api) -> None:
    mine = mint(api, uploads=2)
    other = mint(api, uploads=1)
    with_key = create(api, 1000).header("Location") or ""
    as_page = Api(api.host, api.port, mine["token"])
    own = create(as_page, 1000).header("Location") or ""
    assert head(as_page, own).status == 200
    assert head(as_page, with_key).status == 404  # the owner's, made with the key
    elsewhere = Api(api.host, api.port, other["token"])
    assert head(elsewhere, own).status == 404  # the same owner's other token
    assert elsewhere.request("DELETE", own, headers=TUS).status == 404
    assert head(api, own).status == 200  # the key reaches all of the owner's uploads


def test_a_patch_still_running_at_the_expiry_stores_nothing_more(
    start_api: StartApi, env: dict[str, str], store: Store, redis_client: Redis
) -> None:
    _, api = start_api({**env, "PICSTREAM_TUS_EXPIRY": "2", "PICSTREAM_READ_TIMEOUT": "60"})
    body = image(3 * PART)
    location = create(api, len(body)).header("Location") or ""
    headers = (
        f"Content-Length: {PART + 100}\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
        "Content-Type: application/offset+octet-stream\r\n"
    )
    sock = socket.create_connection((api.host, api.port))
    sock.sendall(api.headers_for("PATCH", location, headers) + body[:1000])
    wait_until(lambda: head(api, location).status == 410, 10, "the upload to expire")
    janitor.run_once(store, Records(redis_client), now=time.time() + 120)
    sock.sendall(body[1000 : PART + 100])
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 410"), answer[:200]
    janitor.run_once(store, Records(redis_client), now=time.time() + 3 * 86_400)
    assert store.keys("") == [] and store.incomplete_uploads() == []


def test_an_upload_whose_last_steps_failed_after_the_store_completed_it_is_finished_by_head(
    api: Api, services: Collaborators, store: Store, redis_client: Redis
) -> None:
    """What the final PATCH leaves when a step after CompleteMultipartUpload fails (the
    metadata copy, the re-hash, Redis): the whole length saved, the object complete, no
    BLAKE3 yet. A tus client that then sees the whole length in HEAD sends nothing more:
    the HEAD finishes the image."""
    body = image(2 * PART + 10)
    location = create(api, len(body)).header("Location") or ""
    assert patch(api, location, 0, body[: 2 * PART]).status == 204
    states = TusStates(services.records.redis, services.leases)
    state = states.load(location.rsplit("/", 1)[1])
    assert state is not None and state.upload_id and len(state.parts) == 2
    # The final PATCH's steps up to and including the completion, as _complete_multipart
    # takes them; then it "fails" (nothing after this runs).
    with states.locked(state) as lease:
        upload = MultipartUpload(store, state.keys.original, state.upload_id)
        last = upload.upload_part(states.next_part(state), memoryview(body[2 * PART :]))
        parts = [*state.parts, (last.part_number, last.etag)]
        states.save(state, lease, offset=len(body), parts=parts, hasher="")
        upload.complete([Part(n, etag) for n, etag in parts])

    finished = head(api, location)

    assert finished.status == 200, finished.body
    assert finished.header("Upload-Offset") == str(len(body))
    record = record_of(api, finished)
    assert record["blake3"] == blake3(body).hexdigest()  # read back: the hash was lost
    only_the_image_is_left(store, record)
    assert redis_client.zcard(PURGES_KEY) == 0 and redis_client.zcard(MULTIPART_KEY) == 0


def test_an_id_deleted_and_made_again_while_a_tus_upload_for_it_runs(
    api: Api, store: Store, redis_client: Redis
) -> None:
    """The tus upload writes under an incarnation of its own: the id's other lives (made,
    deleted, made again meanwhile) are never touched, and its end agrees with them."""
    body = image(2 * PART + 77)
    location = create(api, len(body), id="reused").header("Location") or ""
    assert patch(api, location, 0, body[: PART + 100]).status == 204
    first = image(len(body))
    assert api.upload(first, "reused").status == 201
    assert api.request("DELETE", "/v1/images/reused").status in (202, 204)
    janitor.run_once(store, Records(redis_client), now=time.time() + 3600)
    # The sweeps of the next hour deleted the first image's incarnation, not the upload's.
    assert head(api, location).header("Upload-Offset") == str(PART + 100)
    second = image(len(body))
    made = api.upload(second, "reused")
    assert made.status == 201

    refused = patch(api, location, PART + 100, body[PART + 100 :])

    assert refused.status == 409  # other bytes under the id: the upload is ended
    assert head(api, location).status == 404
    record = api.request("GET", "/v1/images/reused").json
    assert record["gen"] == made.json["gen"] and record["blake3"] == blake3(second).hexdigest()
    assert api.request("GET", "/v1/images/reused/original").body == second
    only_the_image_is_left(store, record)
    assert redis_client.zcard(MULTIPART_KEY) == 0


def test_a_tus_upload_finishing_after_its_id_was_deleted_makes_the_image_anew(
    api: Api, store: Store
) -> None:
    body = image(PART + 10)
    location = create(api, len(body), id="gone").header("Location") or ""
    assert patch(api, location, 0, body[:100]).status == 204
    assert api.upload(image(len(body)), "gone").status == 201
    assert api.request("DELETE", "/v1/images/gone").status in (202, 204)
    last = patch(api, location, 100, body[100:])
    assert last.status == 204 and last.header("Picstream-Image") == "/v1/images/gone"
    record = record_of(api, last)
    assert record["blake3"] == blake3(body).hexdigest()
    assert api.request("GET", "/v1/images/gone/original").body == body
